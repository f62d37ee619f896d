"""Best-of-N random search and the method registry, on a tiny untrained shapes16 model."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from noiserefine.backbones.shapes16 import Shapes16Backbone
from noiserefine.errors import NoiseRefineError
from noiserefine.evaluation.scorers import load_scorer
from noiserefine.generation import NoiseMethod, SamplingOptions
from noiserefine.guidance import Guidance
from noiserefine.methods import registry
from noiserefine.methods.registry import MethodContext
from noiserefine.methods.search import BestOfN, Candidates, best_of_n, sample_and_score
from noiserefine.sampling import noise_for_seeds

PROMPTS = ["a red circle on the left", "a blue square on the top", "a yellow triangle on the bottom"]
FAST = SamplingOptions(steps=2)


@pytest.fixture(scope="module")
def backbone():
    return Shapes16Backbone.create(0).eval()


def scorer(images, prompts):
    return torch.sigmoid(4 * images[:, 1].mean((1, 2)))


def test_best_of_n_picks_the_argmax(backbone):
    x_T = noise_for_seeds([0, 1, 2], (3, 16, 16))
    n = 5
    pool = torch.cat([x_T[:, None], Candidates(x_T).draw([0, 1, 2], n - 1)], dim=1)  # the method's candidates
    cond = backbone.encode_prompts(PROMPTS)
    scores = torch.stack([sample_and_score(backbone, scorer, pool[:, k], cond, None, PROMPTS, FAST)
                          for k in range(n)], dim=1)
    result = best_of_n(backbone, scorer, x_T, PROMPTS, n, FAST)
    expect = scores.argmax(1)
    assert len(set(expect.tolist()) | {0}) > 1, "degenerate case: x_T wins everywhere"
    assert torch.equal(result.noise, pool[torch.arange(3), expect])
    assert torch.allclose(result.score, scores.max(1).values)


def test_best_of_one_is_the_gaussian_noise_and_stats(backbone):
    x_T = noise_for_seeds([3, 4], (3, 16, 16))
    assert torch.equal(BestOfN(backbone, scorer, 1, FAST)(x_T, PROMPTS[:2]), x_T)
    method = BestOfN(backbone, scorer, 3, FAST)
    method(x_T, PROMPTS[:2])
    assert isinstance(method, NoiseMethod)
    assert method.stats["scorer_calls_per_image"] == 3 and method.extra_nfe == 3 * FAST.nfe
    with pytest.raises(NoiseRefineError, match="n >= 1"):
        BestOfN(backbone, scorer, 0)


def test_candidates_depend_on_the_noise_not_the_batch():
    x_T = noise_for_seeds([5, 6], (3, 16, 16))
    assert torch.equal(Candidates(x_T).draw([1], 2)[0], Candidates(x_T[1:]).draw([0], 2)[0])
    assert not torch.equal(Candidates(x_T).draw([0], 1), Candidates(x_T).draw([1], 1))


def test_registry_builds_search_methods_and_refuses_bad_options(backbone):
    judge = load_scorer("judge")
    ctx = MethodContext(backbone, SamplingOptions(steps=2), judge)
    method = registry.build("best-of-n", ctx, budget=2)
    assert method.name == "best-of-n" and method.n == 2 and method.sampling.nfe == 2
    nd = registry.build("noise-diffusion", replace(ctx, sampling=SamplingOptions(Guidance(cfg=2.0), 3)), rounds=2)
    assert nd.config.rounds == 2 and nd.sampling.guidance.cfg == 2.0 and nd.sampling.nfe == 6
    with pytest.raises(NoiseRefineError, match="no option"):
        registry.build("best-of-n", ctx, rounds=3)
    with pytest.raises(NoiseRefineError, match="unknown noise method"):
        registry.build("golden-retriever", ctx)
    with pytest.raises(NoiseRefineError, match="searches under a scorer"):
        registry.build("best-of-n", MethodContext(backbone))
    with pytest.raises(NoiseRefineError, match="loads no weights"):
        registry.check_weights("gaussian", Path("refiner.safetensors"))


def test_every_search_method_samples_candidates_with_the_callers_options(backbone):
    """No list of search methods to keep up to date: every entry that searches gets ctx.sampling."""
    sampling = SamplingOptions(Guidance(cfg=2.0, start=0.5), steps=3)
    ctx = MethodContext(backbone, sampling, load_scorer("judge"))
    searchers = [name for name, e in registry.METHODS.items() if e.searches]
    assert searchers == ["noise-diffusion", "best-of-n"]
    assert all(registry.build(name, ctx).sampling == sampling for name in searchers)
