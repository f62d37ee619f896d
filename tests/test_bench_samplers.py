"""Bench rows sampled with a chosen scheduler (paper Fig. 28: DDIM, Euler, DPM-Solver++), and the
bench's decoding in batches of --batch-size (issue 14, items 5 and 6)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from sd_components import make_tiny_sd_pipe

from noiserefine.backbones.loading import load_backbone
from noiserefine.backbones.stable_diffusion import StableDiffusionBackbone
from noiserefine.errors import NoiseRefineError
from noiserefine.evaluation.bench import parse_row, run_bench
from noiserefine.guidance import Guidance, Teacher
from noiserefine.methods.refine import NoiseRefiner, RefinerConfig


def test_scheduler_row_tokens():
    assert parse_row("gaussian").scheduler is None  # the bench's --scheduler
    assert parse_row("refined@euler").scheduler == "euler"
    spec = parse_row("gaussian@cfg2+dpmpp+steps10")
    assert (spec.scheduler, spec.guidance, spec.steps) == ("dpm++", Guidance(cfg=2.0), 10)
    assert replace(spec, scheduler="ddim").label == "gaussian (cfg2, 10 steps)"  # ddim, the default, unnamed
    assert spec.label == "gaussian (cfg2, 10 steps, dpm++)"
    for bad in ("gaussian@heun", "gaussian@euler+ddim", "gaussian@dpm"):
        with pytest.raises(NoiseRefineError, match="bad bench row option"):
            parse_row(bad)


def test_rows_sample_with_their_scheduler_on_shapes16(tmp_path):
    """A row's scheduler is used (an Euler row is not the DDIM row), a refined row's teacher row is
    added with the same scheduler, and --scheduler sets the rows that name none."""
    teacher = Teacher(Guidance(cfg=2.0), steps=2)
    NoiseRefiner(load_backbone(), RefinerConfig(rank=2, teacher=teacher.to_record())).save(tmp_path / "r.safetensors")
    run_bench(tmp_path / "a", n=2, batch_size=2, rows="gaussian@steps2,gaussian@euler+steps2,refined@dpmpp+steps2",
              refiner=tmp_path / "r.safetensors", progress=False, rounds=1)
    report = json.loads((tmp_path / "a" / "bench.json").read_text())
    rows = {r["row"]: r for r in report["rows"]}
    assert list(rows) == ["gaussian (unguided, 2 steps)", "gaussian (cfg2, 2 steps, dpm++)",
                          "gaussian (unguided, 2 steps, euler)", "refined (unguided, 2 steps, dpm++)"]
    assert [r["scheduler"] for r in rows.values()] == ["ddim", "dpm++", "euler", "dpm++"]
    assert rows["refined (unguided, 2 steps, dpm++)"]["teacher_row"] == "gaussian (cfg2, 2 steps, dpm++)"
    assert rows["gaussian (unguided, 2 steps)"]["fd"] != rows["gaussian (unguided, 2 steps, euler)"]["fd"]
    assert report["meta"]["sampler"] == "ddim (trailing)"
    run_bench(tmp_path / "b", n=2, batch_size=2, rows="gaussian@steps2", scheduler="euler", progress=False, rounds=1)
    report = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert report["rows"][0]["fd"] == rows["gaussian (unguided, 2 steps, euler)"]["fd"]
    assert report["meta"]["sampler"] == "euler (trailing)"
    with pytest.raises(NoiseRefineError, match="unknown scheduler"):
        run_bench(tmp_path / "c", n=2, batch_size=2, rows="gaussian", scheduler="heun", progress=False)


def test_real_model_bench_decodes_in_batches_of_the_batch_size(tmp_path, monkeypatch):
    """Five images at batch size 2 in one round: three VAE calls of 2, 2 and 1 images (it was one of 5)."""
    make_tiny_sd_pipe().save_pretrained(tmp_path / "sd")
    sizes: list[int] = []
    decode = StableDiffusionBackbone.decode
    monkeypatch.setattr(StableDiffusionBackbone, "decode",
                        lambda self, latents: sizes.append(len(latents)) or decode(self, latents))
    run_bench(tmp_path / "bench", n=5, batch_size=2, rows="gaussian@steps2", model=str(tmp_path / "sd"),
              progress=False, rounds=1)
    assert sizes == [2, 2, 1]
