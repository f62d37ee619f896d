"""Promises of methods/noise_diffusion.py that tests/test_noise_diffusion.py does not check:

- one round, composed (module docstring, steps 1-4): from the round's score s and its
  stop-gradient gradient g = ds/dz, gamma = clip(1 - sqrt(s)), the candidate sigma* of the image's
  own stream maximising <g, v_i> / ||v_i||^2 with v_i = (sqrt(1 - gamma) - 1) z + sqrt(gamma) sigma_i,
  and z' = sqrt(1 - gamma) z + sqrt(gamma) sigma*; candidates are sampled with the caller's guidance;
- `NoiseDiffusionConfig`: rounds >= 1, candidates >= 1, 0 < gamma_min <= gamma_max <= 1.
"""

from __future__ import annotations

import pytest
import torch

from noiserefine.backbones.shapes16 import Shapes16Backbone
from noiserefine.errors import NoiseRefineError
from noiserefine.generation import SamplingOptions
from noiserefine.guidance import Guidance
from noiserefine.methods.noise_diffusion import NoiseDiffusionConfig, optimize_noise
from noiserefine.methods.search import Candidates, sample_and_score
from noiserefine.sampling import noise_for_seeds

PROMPTS = ["a red circle on the left", "a blue square on the top"]
SAMPLING = SamplingOptions(Guidance(cfg=2.0), steps=2)
K = 16


@pytest.fixture(scope="module")
def backbone():
    return Shapes16Backbone.create(0).eval()


def _red(images, prompts):
    """A differentiable score in (0, 0.3)."""
    return 0.3 * torch.sigmoid(3 * images[:, 0].mean((1, 2)) - images[:, 2].mean((1, 2)))


class LaterIsBetter:
    """`_red` plus 0.5 from the second call on: round 2 always beats round 1, so the search returns
    the noise it moved to (same gradient as `_red`)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, images, prompts):
        bonus = 0.5 if self.calls else 0.0
        self.calls += 1
        return _red(images, prompts) + bonus


def _round_two_by_hand(backbone, x_T, gamma_min=0.05, gamma_max=0.9):
    cond, uncond = backbone.encode_prompts(PROMPTS), backbone.encode_prompts([""] * len(PROMPTS))
    z = x_T.clone().requires_grad_(True)
    score = sample_and_score(backbone, _red, z, cond, uncond, PROMPTS, SAMPLING, grad_mode="msd")
    (grad,) = torch.autograd.grad(score.sum(), z)
    gamma = (1 - score.detach().sqrt()).clamp(gamma_min, gamma_max)[:, None, None, None, None]
    pool = Candidates(x_T).draw(range(len(x_T)), K)  # (B, K, C, H, W)
    v = ((1 - gamma).sqrt() - 1) * x_T[:, None] + gamma.sqrt() * pool
    alignment = (v * grad[:, None]).sum((2, 3, 4)) / v.pow(2).sum((2, 3, 4))
    sigma = pool[torch.arange(len(x_T)), alignment.argmax(1)]
    g = gamma[:, 0]
    return (1 - g).sqrt() * x_T + g.sqrt() * sigma


def test_one_round_moves_the_noise_as_the_paper_composes_it(backbone):
    x_T = noise_for_seeds([5, 6], backbone.latent_shape)
    result = optimize_noise(backbone, LaterIsBetter(), x_T, PROMPTS,
                            NoiseDiffusionConfig(rounds=2, candidates=K, threshold=0.9999), SAMPLING)
    assert result.rounds.tolist() == [2, 2]
    torch.testing.assert_close(result.noise, _round_two_by_hand(backbone, x_T), rtol=1e-5, atol=1e-5)
    cond, uncond = backbone.encode_prompts(PROMPTS), backbone.encode_prompts(["", ""])
    rescored = sample_and_score(backbone, _red, result.noise, cond, uncond, PROMPTS, SAMPLING) + 0.5
    torch.testing.assert_close(result.score, rescored, rtol=1e-5, atol=1e-6)  # scored with CFG 2


@pytest.mark.parametrize("bad", [dict(rounds=0), dict(candidates=0), dict(gamma_min=0.0),
                                 dict(gamma_max=1.5), dict(gamma_min=0.5, gamma_max=0.2)])
def test_config_bounds(bad):
    with pytest.raises(NoiseRefineError):
        NoiseDiffusionConfig(**bad)
