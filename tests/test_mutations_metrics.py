"""Promises of evaluation/metrics.py that tests/test_metrics.py does not check:

- `frechet_distance` refuses features with NaN or inf;
- `judge_features`: (N, D) float64 for any N, batching included (N above one batch);
- `reference_features`: the features of `n` renders of uniform prompts drawn from `seed` (the same
  stream draws prompts and renders), per judge;
- `score_images` needs N >= 2 images (FD needs a covariance) and says so.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from noiserefine.errors import NoiseRefineError
from noiserefine.evaluation.judge import load_judges
from noiserefine.evaluation.metrics import frechet_distance, judge_features, reference_features, score_images
from noiserefine.world.shapes16 import random_prompts, render


@pytest.fixture(scope="module")
def judges():
    return load_judges()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_frechet_distance_refuses_non_finite_features(bad):
    a = np.random.default_rng(0).standard_normal((10, 3))
    b = a.copy()
    b[4, 1] = bad
    for x, y in ((a, b), (b, a)):
        with pytest.raises(NoiseRefineError, match="NaN or inf"):
            frechet_distance(x, y)


def test_judge_features_cover_every_image_past_one_batch(judges):
    judge = judges["primary"]
    images = torch.rand(503, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    feats = judge_features(judge, images)
    assert feats.shape == (503, judge.feature_dim) and feats.dtype == np.float64
    with torch.no_grad():
        tail = judge.features(images[-3:]).double().numpy()
    np.testing.assert_allclose(feats[-3:], tail, rtol=1e-5, atol=1e-6)


def test_reference_features_are_renders_of_the_seeded_prompts(judges):
    n, seed = 40, 5
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(render(random_prompts(n, rng), rng))
    for judge in judges.values():
        expect = judge_features(judge, images)
        np.testing.assert_allclose(reference_features(judge, n=n, seed=seed), expect, rtol=1e-6, atol=1e-8)


def test_score_images_needs_two_images(judges):
    with pytest.raises(NoiseRefineError, match="N >= 2"):
        score_images(torch.zeros(1, 3, 16, 16), ["a red circle on the left"], judges)
