"""Noise Diffusion: the distribution-preserving update, the adaptive step, gradient-guided
selection, best-not-last, early stopping and statistics, on a tiny untrained shapes16 model."""

import pytest
import torch

from noiserefine.backbones.shapes16 import Shapes16Backbone
from noiserefine.errors import NoiseRefineError
from noiserefine.generation import SamplingOptions
from noiserefine.methods.noise_diffusion import (
    NoiseDiffusion,
    NoiseDiffusionConfig,
    adaptive_step,
    distribution_preserving_update,
    optimize_noise,
    select_candidate,
)
from noiserefine.methods.search import sample_and_score
from noiserefine.sampling import noise_for_seeds

PROMPTS = ["a red circle on the left", "a blue square on the top", "a green triangle on the right"]
FAST = SamplingOptions(steps=2)


@pytest.fixture(scope="module")
def backbone():
    return Shapes16Backbone.create(0).eval()


def _noise(n: int) -> torch.Tensor:
    return noise_for_seeds(list(range(n)), (3, 16, 16))


class ScheduledScorer:
    """Differentiable scorer whose k-th call returns `values[k]` for every image (zero gradient)."""

    def __init__(self, values):
        self.values, self.calls = list(values), 0

    def __call__(self, images, prompts):
        value = self.values[min(self.calls, len(self.values) - 1)]
        self.calls += 1
        return torch.full((len(images),), value) + 0 * images.sum((1, 2, 3))


def test_distribution_preserving_update_keeps_standard_normal():
    g = torch.Generator().manual_seed(0)
    z, s = torch.randn(400_000, generator=g), torch.randn(400_000, generator=g)
    for gamma in (0.05, 0.5, 0.9):
        out = distribution_preserving_update(z[:, None], s[:, None], torch.full((len(z),), gamma)).squeeze(1)
        assert abs(out.mean().item()) < 0.01
        assert abs(out.var().item() - 1) < 0.01
        # covariance with the old noise is sqrt(1 - gamma): the step size is what gamma says
        assert abs((out * z).mean().item() - (1 - gamma) ** 0.5) < 0.01


def test_adaptive_step_is_one_minus_sqrt_score_clipped():
    gamma = adaptive_step(torch.tensor([0.0, 0.25, 0.64, 1.0]), 0.05, 0.9)
    assert torch.allclose(gamma, torch.tensor([0.9, 0.5, 0.2, 0.05]))


def test_select_candidate_follows_the_gradient():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 3, 4, 4, generator=g)
    grad = torch.randn(2, 3, 4, 4, generator=g)
    pool = torch.randn(2, 5, 3, 4, 4, generator=g)
    pool[0, 3] = 3 * grad[0] / grad[0].norm() * 48 ** 0.5  # strongly aligned candidate for image 0
    pool[1, 1] = -pool[1, 1].abs() * grad[1].sign()  # anti-aligned: must not be chosen for image 1
    gamma = torch.tensor([0.5, 0.5])
    picked = select_candidate(z, grad, pool, gamma)
    assert torch.equal(picked[0], pool[0, 3])
    v = ((1 - 0.5) ** 0.5 - 1) * z[1] + 0.5 ** 0.5 * pool[1]
    crit = (v * grad[1]).flatten(1).sum(1) / v.flatten(1).pow(2).sum(1)
    assert torch.equal(picked[1], pool[1, crit.argmax()]) and crit.argmax() != 1


def test_returns_the_best_not_the_last_iterate(backbone):
    x_T = _noise(2)
    worse = ScheduledScorer([0.6, 0.3, 0.1])  # every later round is worse
    result = optimize_noise(backbone, worse, x_T, PROMPTS[:2], NoiseDiffusionConfig(rounds=3, candidates=4), FAST)
    assert worse.calls == 3 and result.rounds.tolist() == [3, 3]
    assert torch.equal(result.noise, x_T)
    assert torch.allclose(result.score, torch.tensor([0.6, 0.6]))
    better = ScheduledScorer([0.1, 0.3, 0.6])
    result = optimize_noise(backbone, better, x_T, PROMPTS[:2], NoiseDiffusionConfig(rounds=3, candidates=4), FAST)
    assert not torch.equal(result.noise, x_T) and torch.allclose(result.score, torch.tensor([0.6, 0.6]))


def test_stops_at_the_threshold_per_image(backbone):
    def scorer(images, prompts):  # image 0 is already good, image 1 never is
        return torch.tensor([0.95 if p == PROMPTS[0] else 0.2 for p in prompts]) + 0 * images.sum((1, 2, 3))

    result = optimize_noise(backbone, scorer, _noise(2), PROMPTS[:2], NoiseDiffusionConfig(rounds=4, threshold=0.9), FAST)
    assert result.rounds.tolist() == [1, 4]


def test_returned_score_is_the_score_of_the_returned_noise_and_stats(backbone):
    def scorer(images, prompts):  # a smooth differentiable score in [0, 1]
        return torch.sigmoid(4 * images[:, 0].mean((1, 2)))

    cfg = NoiseDiffusionConfig(rounds=3, candidates=8, threshold=0.99)
    x_T, cond = _noise(3), backbone.encode_prompts(PROMPTS)
    result = optimize_noise(backbone, scorer, x_T, PROMPTS, cfg, FAST)
    rescored = sample_and_score(backbone, scorer, result.noise, cond, None, PROMPTS, FAST)
    first = sample_and_score(backbone, scorer, x_T, cond, None, PROMPTS, FAST)
    assert torch.allclose(rescored, result.score, atol=1e-5)
    assert (result.score >= first - 1e-6).all()
    method = NoiseDiffusion(backbone, scorer, cfg, FAST)
    assert torch.equal(method(x_T, PROMPTS), result.noise)
    stats = method.stats
    assert abs(stats["avg_best_score"] - result.score.mean().item()) < 1e-5
    assert stats["scorer_calls_per_image"] == stats["avg_rounds"] == result.rounds.float().mean().item()
    assert method.extra_nfe == stats["method_nfe_per_image"] == stats["avg_rounds"] * FAST.nfe


def test_result_does_not_depend_on_the_batch(backbone):
    def scorer(images, prompts):
        return torch.sigmoid(images[:, 2].mean((1, 2)))

    cfg = NoiseDiffusionConfig(rounds=3, candidates=4, threshold=0.99)
    x_T = _noise(3)
    together = optimize_noise(backbone, scorer, x_T, PROMPTS, cfg, FAST)
    alone = optimize_noise(backbone, scorer, x_T[1:2], PROMPTS[1:2], cfg, FAST)
    assert torch.allclose(together.noise[1], alone.noise[0], atol=1e-5)


def test_bad_scorers_and_config_are_refused(backbone):
    def outside(images, prompts):
        return 2 + 0 * images.sum((1, 2, 3))

    with pytest.raises(NoiseRefineError, match=r"\[0, 1\]"):
        optimize_noise(backbone, outside, _noise(1), PROMPTS[:1], sampling=FAST)
    with pytest.raises(NoiseRefineError, match="differentiable"):
        optimize_noise(backbone, lambda im, p: torch.full((len(im),), 0.5), _noise(1), PROMPTS[:1], sampling=FAST)
    with pytest.raises(NoiseRefineError, match="gamma"):
        NoiseDiffusionConfig(gamma_min=0.5, gamma_max=0.2)
