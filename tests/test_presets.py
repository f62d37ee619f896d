"""Named recipes (paper appendix D) and their merge with explicit CLI flags."""

from __future__ import annotations

import dataclasses

import click
import pytest
from click.testing import CliRunner

from noiserefine.cli import sample, targets
from noiserefine.errors import NoiseRefineError
from noiserefine.presets import PRESETS, apply_preset, explicit_options, get_preset
from noiserefine.sampling import seeds_from_range
from noiserefine.train import TrainConfig


def test_paper_values():
    sd21, sdxl, sit = get_preset("sd21"), get_preset("sdxl"), get_preset("sit-xl-2")
    for p in (sd21, sdxl):  # D.1 / D.2.1: CFG 7 + PAG 3, N' = 20 DDIM, N = 10
        teacher = (p.targets["cfg"], p.targets["pag"], p.targets["steps"], p.targets["scheduler"])
        assert teacher == ("7", 3.0, 20, "ddim")
        assert p.train["msd_steps"] == 10 and p.targets["score"] == "aesthetic"
    assert (sd21.train["rank"], sdxl.train["rank"]) == (128, 256)
    assert (sd21.kept_targets, sdxl.kept_targets, sit.num_targets) == (50_000, 181_000, 100_000)
    assert sd21.train["steps"] * sd21.train["batch_size"] >= 6 * 50_000  # E = 6 epochs of M = 50K (A.7)
    teacher = (sit.targets["cfg"], sit.targets["pag"], sit.targets["steps"], sit.targets["scheduler"])
    assert teacher == ("4", 0.0, 20, "euler")
    assert sit.targets["score"] == "none" and sit.train["keep_fraction"] == 1.0  # no filtering for SiT
    assert sit.class_prompts == tuple(str(i) for i in range(1, 101))  # classes 1..100
    assert all(p.train["mixed_precision"] in ("no", "fp16", "bf16") and p.sources for p in PRESETS.values())


def test_preset_options_are_real_options():
    """Every preset value names an option of the library call behind its command, in CLI form."""
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    target_params = {p.name for p in targets.params}  # CLI form: --cfg/--steps build the Teacher
    sample_params = {p.name for p in sample.params}
    for preset in PRESETS.values():
        assert set(preset.train) <= train_fields, preset.name
        assert set(preset.targets) <= target_params, preset.name
        assert set(preset.sample) <= sample_params, preset.name
        seeds = seeds_from_range(preset.targets["seeds"])
        assert len(seeds) == preset.num_targets and seeds[0] == 0
        assert [float(c) for c in preset.targets["cfg"].split(",")]
        TrainConfig(**preset.train)  # constructs


def test_apply_preset_explicit_flags_win():
    defaults = {"steps": 400, "batch_size": 32, "lr": 1e-4, "rank": 16, "msd_steps": 10, "model": None, "seed": 0}
    merged = apply_preset("sdxl", "train", {**defaults, "rank": 8, "seed": 5}, explicit={"rank", "seed"})
    assert merged["rank"] == 8 and merged["seed"] == 5  # typed by the user
    assert merged["steps"] == get_preset("sdxl").train["steps"] and merged["scheduler"] == "ddim"  # from the preset
    assert merged["model"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert apply_preset(None, "train", defaults, explicit=()) == defaults
    assert apply_preset("sd21", "sample", {"dtype": "fp32"}, explicit=())["dtype"] == "bf16"
    assert "dtype" not in apply_preset("sd21", "sample", {}, explicit=())  # only options the command has
    sit = apply_preset("sit-xl-2", "train", {**defaults, "model": "runs/sit-folder"}, explicit={"model"})
    assert sit["model"] == "runs/sit-folder" and sit["scheduler"] == "euler"
    with pytest.raises(NoiseRefineError, match="unknown preset"):
        apply_preset("sd3", "train", defaults, explicit=())
    with pytest.raises(NoiseRefineError, match="presets cover"):
        apply_preset("sd21", "bench", defaults, explicit=())


def test_explicit_options_reads_click_sources():
    """The CLI wiring: a --preset option plus one apply_preset call before the library call."""
    seen = {}

    @click.command()
    @click.option("--preset", default=None)
    @click.option("--rank", default=16)
    @click.option("--lr", default=1e-4)
    @click.pass_context
    def train(ctx, preset, **params):
        seen.update(apply_preset(preset, "train", params, explicit_options(ctx)))

    result = CliRunner().invoke(train, ["--preset", "sd21", "--lr", "3e-4"])
    assert result.exit_code == 0, result.output
    assert seen["lr"] == 3e-4 and seen["rank"] == 128
