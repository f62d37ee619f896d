"""`noiserefine bench` on the shipped models at a tiny size: rows, teacher row, ratios, files."""

from __future__ import annotations

import json

import pytest

from noiserefine.errors import NoiseRefineError
from noiserefine.backbones.loading import load_backbone
from noiserefine.evaluation.bench import MAX_BENCH_IMAGES, SPLITS, bench_setup, parse_row, run_bench
from noiserefine.guidance import Guidance, Teacher
from noiserefine.methods.refine import NoiseRefiner, RefinerConfig


def test_row_grammar():
    spec = parse_row("gaussian@cfg2+pag3+auto2+start0.4+stop0.9+steps5+n100")
    assert (spec.method, spec.guidance, spec.steps, spec.n) == (
        "gaussian", Guidance(cfg=2.0, pag=3.0, start=0.4, stop=0.9, auto=2.0), 5, 100)
    assert parse_row("refined@strength0.5+w3").options == (("strength", 0.5), ("teacher_scale", 3.0))
    assert parse_row("best-of-n@budget8").options == (("budget", 8),)
    with pytest.raises(NoiseRefineError, match="bad bench row option"):
        parse_row("gaussian@speed9")
    with pytest.raises(NoiseRefineError, match="bad bench row option"):
        parse_row("gaussian@strength0.5")  # an option of another method
    with pytest.raises(NoiseRefineError, match="unknown noise method"):
        parse_row("golden-retriever")


def test_bench_runs_refined_rows_beside_their_teacher(tmp_path):
    md = run_bench(tmp_path, n=4, batch_size=4, rows="gaussian@steps2,refined@steps2,refined@steps2+strength0.5",
                   progress=False)
    report = json.loads((tmp_path / "bench.json").read_text())
    rows = report["rows"]
    teacher = report["meta"]["reference_row"]
    assert teacher == "gaussian (auto3)"  # the shipped refiner's teacher, added to the run
    assert [r["row"] for r in rows].count(teacher) == 1
    ref = next(r for r in rows if r["row"] == teacher)
    assert ref["ratio_to_cfg"] == 1.0 and ref["nfe_per_image"] == 40
    refined = [r for r in rows if r["method"] == "refined"]
    assert len(refined) == 2 and all(
        r["teacher_auto"] == 3.0 and r["teacher_row"] == teacher and r["nfe_per_image"] == 3
        for r in refined)
    for key in ("sec_per_image", "adherence", "fd", "peak_mem_mb", "heldout_adherence"):
        assert all(key in r for r in rows)
    assert teacher in md.read_text()


def test_dev_and_test_splits_are_fixed_and_disjoint():
    dev, test = bench_setup(50, 10, split="dev"), bench_setup(50, 10, split="test")
    assert not set(dev.seeds) & set(test.seeds)
    assert dev.prompts != test.prompts  # each split draws its own prompts
    assert bench_setup(20, 10, split="test").prompts == test.prompts[:20]  # the first n of one draw
    assert SPLITS["dev"].noise_seed_offset + MAX_BENCH_IMAGES <= SPLITS["test"].noise_seed_offset
    with pytest.raises(NoiseRefineError, match="unknown bench split"):
        bench_setup(5, 5, split="train")


def test_scale_conditioned_refiner_rows_get_their_teacher_at_each_scale(tmp_path):
    """refined@wW of a refiner trained on several teacher scales runs beside gaussian at scale W."""
    backbone = load_backbone()
    teacher = Teacher(Guidance(cfg=2.0), steps=2, scale_field="cfg", scales=(2.0, 3.0))
    NoiseRefiner(backbone, RefinerConfig(rank=4, scale_conditioning=True, teacher=teacher.to_record())).save(
        tmp_path / "refiner.safetensors")
    run_bench(tmp_path / "bench", n=4, batch_size=4, rows="refined@w2+steps2,refined@w3+steps2",
              refiner=tmp_path / "refiner.safetensors", progress=False, split="test")
    report = json.loads((tmp_path / "bench" / "bench.json").read_text())
    rows = {r["row"]: r for r in report["rows"]}
    assert set(rows) == {"gaussian (cfg2, 2 steps)", "gaussian (cfg3, 2 steps)",
                         "refined (unguided, 2 steps, w=2)", "refined (unguided, 2 steps, w=3)"}
    assert rows["refined (unguided, 2 steps, w=3)"]["teacher_row"] == "gaussian (cfg3, 2 steps)"
    assert report["meta"]["split"] == "test"


def test_refiner_and_npnet_weights_go_to_their_own_rows(tmp_path):
    """--refiner names the refined rows' weights only: a golden row beside them keeps its NPNet."""
    from noiserefine.io import shipped_path

    run_bench(tmp_path / "b", n=2, batch_size=2, rows="golden@steps2,refined@steps2", progress=False,
              refiner=shipped_path("shapes16-refiner"))
    rows = [r["row"] for r in json.loads((tmp_path / "b" / "bench.json").read_text())["rows"]]
    assert rows == ["golden (unguided, 2 steps)", "gaussian (auto3)", "refined (unguided, 2 steps)"]
    with pytest.raises(NoiseRefineError, match=r"NPNet not found: .*shapes16-refiner"):  # --npnet goes to golden
        run_bench(tmp_path / "c", n=2, batch_size=2, rows="golden@steps2", progress=False,
                  npnet=shipped_path("shapes16-refiner"))
