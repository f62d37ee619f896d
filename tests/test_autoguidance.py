"""Autoguidance (Karras et al. 2024): diffusers' `AutoGuidance` combination, its sum with CFG and
PAG, the analytic no-op with an identical guide, model-evaluation counts, the CLI and bad input."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from noiserefine.backbones.base import attach_guide
from noiserefine.backbones.shapes16 import Shapes16Backbone
from noiserefine.cli import main
from noiserefine.errors import NoiseRefineError
from noiserefine.evaluation.bench import parse_row
from noiserefine.guidance import Guidance, conditioning, guided_prediction
from noiserefine.sampling import denoise, make_scheduler, noise_for_seeds

PROMPTS = ["a red circle on the left", "a blue square on the top"]


@pytest.fixture
def guided_pair():
    """A tiny shapes16 backbone with a differently seeded tiny guide, and inputs at one timestep."""
    bb = attach_guide(Shapes16Backbone.create(0), Shapes16Backbone.create(1))
    x = noise_for_seeds([1, 2], bb.latent_shape)
    return bb, x, torch.tensor(500), conditioning(bb, PROMPTS, Guidance(auto=2.0)), bb.encode_prompts(["", ""])


def test_matches_diffusers_autoguidance(guided_pair):
    from diffusers.guiders import AutoGuidance

    logging.getLogger("diffusers").setLevel(logging.ERROR)  # guiders warn that they are experimental
    bb, x, t, cond, _ = guided_pair
    with torch.no_grad():
        ours = guided_prediction(bb, x, t, cond, None, Guidance(auto=2.5))
        good = bb.predict(x, t, bb.encode_prompts(PROMPTS))
        bad = bb.guide.predict(x, t, bb.guide.encode_prompts(PROMPTS))
    # diffusers makes its bad model by skipping layers; the combination of the two predictions is ours
    oracle = AutoGuidance(guidance_scale=2.5, auto_guidance_layers=[0], dropout=1.0).forward(pred_cond=good, pred_uncond=bad)
    torch.testing.assert_close(ours, oracle.pred, rtol=0, atol=1e-6)
    assert not torch.allclose(ours, good, atol=1e-3)  # the guide made a difference


def test_sums_with_cfg_and_pag(guided_pair):
    bb, x, t, cond, uncond = guided_pair
    with torch.no_grad():
        both = guided_prediction(bb, x, t, cond, uncond, Guidance(cfg=2.0, pag=1.0, auto=3.0))
        cfg_pag = guided_prediction(bb, x, t, cond, uncond, Guidance(cfg=2.0, pag=1.0))
        good = bb.predict(x, t, bb.encode_prompts(PROMPTS))
        bad = bb.guide.predict(x, t, bb.guide.encode_prompts(PROMPTS))
    torch.testing.assert_close(both, cfg_pag + 2.0 * (good - bad), rtol=0, atol=1e-5)


def test_identical_guide_changes_nothing():
    """g = c when the guide is the model itself, so (a - 1)(c - g) = 0 at every step."""
    bb = attach_guide(Shapes16Backbone.create(0), Shapes16Backbone.create(0))
    x_T, cond = noise_for_seeds([3, 4], bb.latent_shape), conditioning(bb, PROMPTS, Guidance(auto=4.0))
    runs = [denoise(bb, make_scheduler("ddim", bb.scheduler_config), x_T, cond, steps=4, guidance=Guidance(auto=a))
            for a in (1.0, 4.0)]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=1e-5)


def test_guide_is_encoded_only_for_autoguidance(guided_pair):
    bb = guided_pair[0]
    assert set(conditioning(bb, PROMPTS, Guidance(cfg=2.0))) == {"encoder_hidden_states"}
    assert set(conditioning(bb, PROMPTS, Guidance(auto=2.0))) == {"encoder_hidden_states", "guide.encoder_hidden_states"}


def test_model_evaluations_names_and_rows():
    assert Guidance(auto=2.0).nfe(20) == 40 and Guidance(cfg=2.0, auto=2.0, start=0.5).nfe(10) == 5 + 5 * 3
    assert Guidance(auto=2.0).name == "auto2" and Guidance(cfg=2.0, pag=1.0, auto=1.5).name == "cfg2+pag1+auto1.5"
    assert Guidance(auto=2.0).is_guided and not Guidance(auto=1.0).is_guided
    spec = parse_row("gaussian@auto2+start0.3")
    assert spec.guidance == Guidance(auto=2.0, start=0.3) and spec.label == "gaussian (auto2[0.3-1])"


def test_bad_input():
    bb = Shapes16Backbone.create(0)
    x, cond = noise_for_seeds([1], bb.latent_shape), bb.encode_prompts(PROMPTS[:1])
    with pytest.raises(NoiseRefineError, match="needs a guide model"):
        guided_prediction(bb, x, torch.tensor(10), cond, None, Guidance(auto=2.0))
    attach_guide(bb, Shapes16Backbone.create(1))
    with pytest.raises(NoiseRefineError, match="guide's conditioning"):
        guided_prediction(bb, x, torch.tensor(10), cond, None, Guidance(auto=2.0))  # not made by `conditioning`
    with pytest.raises(NoiseRefineError, match="auto >= 1"):
        Guidance(auto=0.5)
    other = Shapes16Backbone.create(1, scheduler_config={**bb.scheduler_config, "prediction_type": "epsilon"})
    with pytest.raises(NoiseRefineError, match="prediction_type"):
        attach_guide(bb, other)


def test_shipped_model_has_its_guide():
    bb = Shapes16Backbone.load()
    assert bb.guide is not None and bb.guide.guide is None
    assert bb.guide.fingerprint() != bb.fingerprint()


def test_cli_sample_with_autoguidance(tmp_path):
    from click.testing import CliRunner

    model, guide, prompts = tmp_path / "m.safetensors", tmp_path / "g.safetensors", tmp_path / "p.txt"
    Shapes16Backbone.create(0).save(model)
    Shapes16Backbone.create(1).save(guide)
    prompts.write_text(PROMPTS[0] + "\n")
    args = ["sample", "--prompt-file", str(prompts), "--seeds", "0-1", "--steps", "2", "--model", str(model)]
    ok = CliRunner().invoke(main, args + ["--auto", "2", "--guide", str(guide), "--out", str(tmp_path / "s")])
    assert ok.exit_code == 0, ok.output
    rows = [json.loads(line) for line in (tmp_path / "s" / "manifest.jsonl").read_text().splitlines()]
    assert [r["auto"] for r in rows] == [2.0, 2.0]
    bad = CliRunner().invoke(main, args + ["--auto", "2", "--out", str(tmp_path / "b")])  # a model with no guide
    assert bad.exit_code == 2 and bad.output.startswith("error: ") and "guide model" in bad.output, bad.output


def test_stable_diffusion_backbone_takes_a_guide():
    """The same rule on the SD adapter (tiny components; the guide's UNet is perturbed to differ)."""
    from sd_components import make_tiny_sd_pipe

    from noiserefine.backbones.stable_diffusion import StableDiffusionBackbone

    bb = StableDiffusionBackbone.from_pipeline(make_tiny_sd_pipe())
    weak = make_tiny_sd_pipe()
    with torch.no_grad():
        weak.unet.conv_out.weight.mul_(0.5)
    attach_guide(bb, StableDiffusionBackbone.from_pipeline(weak))
    x, t, prompts = noise_for_seeds([5], bb.latent_shape), torch.tensor(700), ["a photo of a cat"]
    with torch.no_grad():
        guidance = Guidance(cfg=3.0, auto=2.0)
        got = guided_prediction(bb, x, t, conditioning(bb, prompts, guidance), bb.encode_prompts([""]), guidance)
        cfg = guided_prediction(bb, x, t, bb.encode_prompts(prompts), bb.encode_prompts([""]), Guidance(cfg=3.0))
        good, bad = bb.predict(x, t, bb.encode_prompts(prompts)), bb.guide.predict(x, t, bb.guide.encode_prompts(prompts))
    torch.testing.assert_close(got, cfg + (good - bad), rtol=0, atol=1e-5)
    assert (good - bad).abs().max() > 1e-3
