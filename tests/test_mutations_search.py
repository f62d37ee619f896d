"""Promises of methods/search.py that tests/test_search.py does not check:

- `sample_and_score`: one score per image (else a clear error); with grad_mode="msd" the score
  keeps a graph back to z through the sampler's update algebra only (model outputs constant), so
  dscore/dz has a closed form for a linear scorer;
- `encode`: the empty prompt's conditioning only when CFG is on;
- `Candidates.draw`: (rows, count, *shape) FRESH standard-normal noises (a second draw is new);
- `best_of_n`: n scorer calls and n * sampling.nfe denoiser evaluations per image, candidates
  sampled with the caller's guidance (the chosen noise's image is the one that was scored), n >= 1.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from noiserefine.backbones.shapes16 import Shapes16Backbone
from noiserefine.errors import NoiseRefineError
from noiserefine.generation import SamplingOptions
from noiserefine.guidance import Guidance
from noiserefine.methods.search import Candidates, best_of_n, encode, sample_and_score
from noiserefine.sampling import denoise, make_scheduler, noise_for_seeds

PROMPTS = ["a red circle on the left", "a blue square on the top", "a yellow triangle on the bottom"]
CFG = SamplingOptions(Guidance(cfg=3.0), steps=2)


@pytest.fixture(scope="module")
def backbone():
    return Shapes16Backbone.create(0).eval()


def _green(images, prompts):
    return torch.sigmoid(4 * images[:, 1].mean((1, 2)))


class Counting:
    """Counts scorer calls and the images the denoiser evaluates (one forward of a [uncond | cond]
    batch of B images counts 2B evaluations)."""

    def __init__(self, backbone) -> None:
        self.scorer_calls, self.evaluations = 0, 0
        self.hook = backbone.denoiser.register_forward_hook(self._forward)

    def _forward(self, module, args, output) -> None:
        self.evaluations += args[0].shape[0]

    def scorer(self, images, prompts):
        self.scorer_calls += 1
        return _green(images, prompts)


def test_sample_and_score_needs_one_score_per_image(backbone):
    x_T = noise_for_seeds([0, 1], backbone.latent_shape)
    cond = backbone.encode_prompts(PROMPTS[:2])
    with pytest.raises(NoiseRefineError, match="one score per image"):
        sample_and_score(backbone, lambda im, p: _green(im, p)[:, None], x_T, cond, None, PROMPTS[:2],
                         SamplingOptions(steps=1))


def test_msd_gradient_runs_through_the_update_algebra_only(backbone):
    """DDIM (eta = 0) with a constant model output v maps x_t to sqrt(a_prev) x0 + sqrt(1 - a_prev) eps,
    x0 = sqrt(a_t) x - sqrt(1 - a_t) v, eps = sqrt(a_t) v + sqrt(1 - a_t) x: linear in x with slope
    sqrt(a_prev a_t) + sqrt((1 - a_prev)(1 - a_t)). For score = <W, x_0>, dscore/dz = W * prod(slopes)."""
    steps = 2
    abar = DDIMScheduler.from_config(backbone.scheduler_config).alphas_cumprod.double()
    n = backbone.scheduler_config["num_train_timesteps"]
    grid = [round(n - k * n / steps) - 1 for k in range(steps)] + [0]  # trailing; the last step ends at abar[0]
    slope = 1.0
    for t, prev in zip(grid, grid[1:]):
        a, a_prev = abar[t], abar[prev]
        slope *= float((a_prev * a).sqrt() + ((1 - a_prev) * (1 - a)).sqrt())
    W = torch.randn(backbone.latent_shape, generator=torch.Generator().manual_seed(0))
    z = noise_for_seeds([3, 4], backbone.latent_shape).requires_grad_(True)
    score = sample_and_score(backbone, lambda im, p: (im * W).sum((1, 2, 3)), z, backbone.encode_prompts(PROMPTS[:2]),
                             None, PROMPTS[:2], SamplingOptions(steps=steps), grad_mode="msd")
    (grad,) = torch.autograd.grad(score.sum(), z)
    torch.testing.assert_close(grad, (slope * W).expand_as(grad).float(), rtol=1e-4, atol=1e-6)


def test_encode_adds_the_empty_prompt_only_for_cfg(backbone):
    cond, uncond = encode(backbone, PROMPTS, SamplingOptions())
    assert uncond is None and torch.equal(cond["encoder_hidden_states"],
                                          backbone.encode_prompts(PROMPTS)["encoder_hidden_states"])
    _, uncond = encode(backbone, PROMPTS, CFG)
    assert torch.equal(uncond["encoder_hidden_states"], backbone.encode_prompts([""] * 3)["encoder_hidden_states"])


def test_candidate_draws_are_fresh_standard_normal_noises():
    stream = Candidates(noise_for_seeds([0, 1], (3, 16, 16)))
    first, second = stream.draw([1], 4), stream.draw([1], 4)
    assert first.shape == (1, 4, 3, 16, 16) and not torch.equal(first, second)
    many = stream.draw([0], 200)
    assert abs(many.mean().item()) < 0.02 and abs(many.std().item() - 1) < 0.02


def test_best_of_n_cost_and_guidance_of_the_scored_samples(backbone):
    x_T, n = noise_for_seeds([0, 1, 2], backbone.latent_shape), 3
    count = Counting(backbone)
    try:
        result = best_of_n(backbone, count.scorer, x_T, PROMPTS, n, CFG)
    finally:
        count.hook.remove()
    assert count.scorer_calls == n  # one call per candidate, on the whole batch
    assert count.evaluations / len(x_T) == n * CFG.nfe == n * 2 * 2  # CFG: 2 evaluations per step
    # the returned score is the score of the returned noise sampled WITH the caller's guidance
    cond, uncond = backbone.encode_prompts(PROMPTS), backbone.encode_prompts([""] * 3)
    with torch.no_grad():
        image = denoise(backbone, make_scheduler("ddim", backbone.scheduler_config), result.noise, cond,
                        uncond=uncond, guidance=Guidance(cfg=3.0), steps=2)
    torch.testing.assert_close(result.score, _green(image, PROMPTS), rtol=1e-5, atol=1e-6)
    with pytest.raises(NoiseRefineError, match="n >= 1"):
        best_of_n(backbone, _green, x_T, PROMPTS, 0, CFG)
