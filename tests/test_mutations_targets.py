"""Guided targets (NoiseRefine section 3.2): each target's x_0 is the teacher's guided sample of its
own x_T at the spec's scale, and `load_targets` keeps the BEST fraction by score, ties by order.

Oracles: an independent guided sampling (the core sampler with a `Guidance` built from the same
numbers, not through the spec) and a scorer whose scores are known in advance."""

from __future__ import annotations

import pytest
import torch

from noiserefine.backbones.shapes16 import Shapes16Backbone
from noiserefine.errors import NoiseRefineError
from noiserefine.guidance import Guidance, Teacher
from noiserefine.sampling import denoise, make_scheduler, noise_for_seeds
from noiserefine.targets import TargetSpec, generate_targets, load_targets

PROMPTS = ["a red circle on the left", "a blue square on the top", "a green triangle on the right"]
STEPS = 2
SCORE_OF_PROMPT = {PROMPTS[0]: 0.2, PROMPTS[1]: 0.9, PROMPTS[2]: 0.5}


@pytest.fixture(scope="module")
def backbone():
    return Shapes16Backbone.create(0).eval()


def _by_prompt(images, prompts):
    """Scores known in advance, with ties: 0.2 / 0.9 / 0.5 by prompt."""
    return torch.tensor([SCORE_OF_PROMPT[p] for p in prompts])


def _spec(seeds, teacher, **kw) -> TargetSpec:
    return TargetSpec(prompts=PROMPTS, seeds=list(seeds), teacher=teacher, **kw)


@torch.no_grad()
def _guided_sample(backbone, seeds, prompts, guidance: Guidance) -> torch.Tensor:
    """The oracle: DDIM sampling of each seed's noise under `guidance`, in the core sampler."""
    x_T = noise_for_seeds(list(seeds), backbone.latent_shape)
    cond, uncond = backbone.encode_prompts(prompts), backbone.encode_prompts([""] * len(prompts))
    return denoise(backbone, make_scheduler("ddim", backbone.scheduler_config), x_T, cond, uncond=uncond,
                   guidance=guidance, steps=STEPS)


def test_targets_are_the_teachers_guided_samples_at_the_specs_scale(backbone, tmp_path):
    teacher = Teacher(Guidance(cfg=2.5, pag=1.0), steps=STEPS)
    data = load_targets(generate_targets(backbone, _spec(range(4), teacher), tmp_path / "t", batch_size=3,
                                         progress=False))
    prompts = [PROMPTS[i % 3] for i in range(4)]
    expect = _guided_sample(backbone, range(4), prompts, Guidance(cfg=2.5, pag=1.0))
    doubled = _guided_sample(backbone, range(4), prompts, Guidance(cfg=5.0, pag=1.0))
    assert (expect - doubled).abs().max() > 1e-2  # the oracle tells the scales apart
    assert data.prompts == prompts and torch.equal(data.x_T[:], noise_for_seeds(list(range(4)), backbone.latent_shape))
    torch.testing.assert_close(data.x_0[:], expect, rtol=1e-5, atol=1e-5)
    assert data.cfg.tolist() == [2.5] * 4


def test_keep_fraction_keeps_the_best_scores_ties_by_order(backbone, tmp_path):
    teacher = Teacher(Guidance(cfg=2.0), steps=STEPS)
    folder = generate_targets(backbone, _spec(range(7), teacher, score="by-prompt"), tmp_path / "t",
                              scorer=_by_prompt, batch_size=4, progress=False)
    everything = load_targets(folder)
    assert everything.score.tolist() == pytest.approx([0.2, 0.9, 0.5, 0.2, 0.9, 0.5, 0.2])
    kept = load_targets(folder, keep_fraction=3 / 7)
    # best three: the two 0.9s (targets 1 and 4), then of the two 0.5s the earlier one (target 2)
    assert kept.score.tolist() == pytest.approx([0.9, 0.5, 0.9])
    assert kept.prompts == [PROMPTS[1], PROMPTS[2], PROMPTS[1]]
    assert torch.equal(kept.x_T[:], everything.x_T[[1, 2, 4]]) and torch.equal(kept.x_0[:], everything.x_0[[1, 2, 4]])
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(NoiseRefineError, match="keep fraction"):
            load_targets(folder, keep_fraction=bad)


def test_keep_fraction_ranks_several_folders_together(backbone, tmp_path):
    teacher = Teacher(Guidance(cfg=2.0), steps=STEPS)
    first = generate_targets(backbone, _spec([0, 1, 2], teacher, score="by-prompt"), tmp_path / "a",
                             scorer=_by_prompt, progress=False)
    # a later folder with more seeds: its prompts start again at PROMPTS[0]
    later = TargetSpec(prompts=[PROMPTS[1], PROMPTS[0]], seeds=[3, 4], teacher=teacher, score="by-prompt")
    second = generate_targets(backbone, later, tmp_path / "b", scorer=_by_prompt, progress=False)
    kept = load_targets([first, second], keep_fraction=0.4)  # 2 of 5: scores 0.2 0.9 0.5 | 0.9 0.2
    assert kept.score.tolist() == pytest.approx([0.9, 0.9])
    assert torch.equal(kept.x_T[:], noise_for_seeds([1, 3], backbone.latent_shape))
    # scores of another scorer, or targets of another step count, do not rank together
    for name, other in (("score", TargetSpec(PROMPTS, [5], teacher, score="another")),
                        ("steps", TargetSpec(PROMPTS, [5], Teacher(Guidance(cfg=2.0), steps=1), score="by-prompt"))):
        folder = generate_targets(backbone, other, tmp_path / name, scorer=_by_prompt, progress=False)
        with pytest.raises(NoiseRefineError, match="another base model or teacher"):
            load_targets([first, folder])
