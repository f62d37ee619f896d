"""`noiserefine bench` on the shipped models at a tiny size: rows, teacher row, ratios, files."""

from __future__ import annotations

import json

import pytest

from noiserefine.errors import NoiseRefineError
from noiserefine.evaluation.bench import parse_row, run_bench
from noiserefine.guidance import Guidance


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
    assert teacher == "gaussian (cfg2)"  # the shipped refiner's teacher, added to the run
    assert [r["row"] for r in rows].count(teacher) == 1
    ref = next(r for r in rows if r["row"] == teacher)
    assert ref["ratio_to_cfg"] == 1.0 and ref["nfe_per_image"] == 40
    refined = [r for r in rows if r["method"] == "refined"]
    assert len(refined) == 2 and all(r["teacher_cfg"] == 2.0 and r["nfe_per_image"] == 3 for r in refined)
    for key in ("sec_per_image", "adherence", "fd", "peak_mem_mb", "heldout_adherence"):
        assert all(key in r for r in rows)
    assert teacher in md.read_text()
