"""Training the embedded base model: exact resume after a kill, refusal to mix recipes, bad settings."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from noiserefine.backbones.shapes16 import Shapes16Backbone
from noiserefine.cli import main
from noiserefine.errors import NoiseRefineError
from noiserefine.io import load_tensors
from noiserefine.sampling import make_scheduler
from noiserefine.train_base import BaseTrainConfig, train_base

TINY = dict(batch_size=4, checkpoint_every=2)


def test_resume_after_kill_reproduces_the_uninterrupted_run(tmp_path):
    straight = train_base(tmp_path / "a", BaseTrainConfig(steps=4, **TINY), progress=False)
    # A run "killed" after its step-2 checkpoint, then restarted with the full length.
    train_base(tmp_path / "b", BaseTrainConfig(steps=2, **TINY), progress=False)
    resumed = train_base(tmp_path / "b", BaseTrainConfig(steps=4, **TINY), progress=False)
    a, b = load_tensors(straight), load_tensors(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    # and training moved the weights at all (the comparison above is not between two inits)
    init = Shapes16Backbone.create(0).denoiser.state_dict()
    key = next(k for k in a if k.startswith("unet.") and k.endswith("conv_in.weight"))
    assert not torch.equal(a[key], init[key.removeprefix("unet.")])


def test_snapshots_are_loadable_models(tmp_path):
    train_base(tmp_path, BaseTrainConfig(steps=2, snapshot_every=1, **TINY), progress=False)
    for step in (1, 2):
        model = Shapes16Backbone.load(tmp_path / "snapshots" / f"shapes16-base-step{step}.safetensors")
        assert model.latent_shape == (3, 16, 16)


def test_resume_with_another_recipe_is_refused(tmp_path):
    train_base(tmp_path, BaseTrainConfig(steps=2, **TINY), progress=False)
    with pytest.raises(NoiseRefineError, match="another configuration.*prompt_dropout 0.15 -> 0.5"):
        train_base(tmp_path, BaseTrainConfig(steps=4, prompt_dropout=0.5, **TINY), progress=False)


@pytest.mark.parametrize("bad", [dict(prompt_dropout=1.0), dict(prompt_dropout=-0.1), dict(steps=0),
                                 dict(lr=0.0), dict(ema_decay=1.0), dict(batch_size=0)])
def test_bad_settings_are_refused(bad):
    with pytest.raises(NoiseRefineError):
        BaseTrainConfig(**bad)


def test_cli_bad_prompt_dropout_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(main, ["train-base", "--prompt-dropout", "1.5", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "prompt_dropout" in lines[0]


def test_noise_schedule_travels_with_the_weights(tmp_path):
    """A base trained with Stable Diffusion's schedule is sampled with it after loading: the card
    beside the weights records it, and alpha_bar_T is that schedule's, not the default's."""
    path = train_base(tmp_path, BaseTrainConfig(steps=1, noise_schedule="sd", **TINY), progress=False)
    model = Shapes16Backbone.load(path)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2  # scaled_linear
    sched = make_scheduler("ddim", model.scheduler_config)
    torch.testing.assert_close(sched.alphas_cumprod[-1].double(), torch.prod(1 - betas), rtol=1e-5, atol=0)
    assert float(torch.prod(1 - betas)) > 1e-3  # non-zero terminal SNR
    default = make_scheduler("ddim", Shapes16Backbone.load().scheduler_config)
    assert default.alphas_cumprod[-1] < 1e-6  # the shipped cosine base: zero terminal SNR


def test_unknown_noise_schedule_is_refused():
    with pytest.raises(NoiseRefineError, match="unknown noise schedule"):
        BaseTrainConfig(noise_schedule="linear")
    result = CliRunner().invoke(main, ["train-base", "--noise-schedule", "linear", "--out", "x"])
    assert result.exit_code == 2
