"""Frechet distance (closed form) and the benchmark figures of `score_images`."""

import numpy as np
import pytest
import torch
from scipy import linalg

from noiserefine.errors import NoiseRefineError
from noiserefine.evaluation.judge import load_judges
from noiserefine.evaluation.metrics import REFERENCE_SIZE, frechet_distance, reference_features, score_images
from noiserefine.world.shapes16 import random_prompts, render


@pytest.fixture(scope="module")
def judges():
    return load_judges()


def _with_moments(rng: np.random.Generator, n: int, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """n samples whose sample mean and (unbiased) sample covariance are exactly `mean` and `cov`."""
    z = rng.standard_normal((n, len(mean)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # whiten: sample cov = I
    return z @ np.linalg.cholesky(cov).T + mean


def test_frechet_distance_closed_form_diagonal():
    rng = np.random.default_rng(0)
    mu_a, mu_b = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    sd_a, sd_b = np.array([1.0, 2.0, 0.5]), np.array([3.0, 2.0, 1.5])
    a = _with_moments(rng, 200, mu_a, np.diag(sd_a**2))
    b = _with_moments(rng, 300, mu_b, np.diag(sd_b**2))
    # for commuting covariances Tr(S_a + S_b - 2 sqrt(S_a S_b)) = sum (sd_a - sd_b)^2
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((sd_a - sd_b) ** 2)  # = 5 + 5
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_closed_form_full_covariance():
    rng = np.random.default_rng(1)
    m = rng.standard_normal((4, 4))
    cov_a, cov_b = m @ m.T + np.eye(4), np.diag([1.0, 2.0, 3.0, 4.0])
    a = _with_moments(rng, 100, np.zeros(4), cov_a)
    b = _with_moments(rng, 100, np.ones(4), cov_b)
    # symmetric form of the trace term: Tr((S_b^1/2 S_a S_b^1/2)^1/2)
    root_b = np.diag(np.sqrt([1.0, 2.0, 3.0, 4.0]))
    cross = np.sum(np.sqrt(np.linalg.eigvalsh(root_b @ cov_a @ root_b)))
    expected = 4.0 + np.trace(cov_a) + np.trace(cov_b) - 2 * cross
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    assert np.isclose(np.trace(linalg.sqrtm(cov_a @ cov_b)).real, cross)


def test_frechet_distance_of_a_set_with_itself_is_zero_and_singular_sets_work():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((50, 8))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    few = rng.standard_normal((5, 8))  # fewer samples than dimensions: singular covariance
    assert np.isfinite(frechet_distance(few, a))


@pytest.mark.parametrize("shapes", [((10, 4), (10, 5)), ((1, 4), (10, 4)), ((10,), (10,))])
def test_frechet_distance_rejects_bad_inputs(shapes):
    with pytest.raises(NoiseRefineError, match="Frechet distance"):
        frechet_distance(np.zeros(shapes[0]), np.zeros(shapes[1]))


def test_reference_features_are_fixed_and_cached(judges):
    judge = judges["primary"]
    feats = reference_features(judge)
    assert feats.shape == (REFERENCE_SIZE, judge.feature_dim)
    assert reference_features(judge) is feats
    assert not np.array_equal(reference_features(judge, n=100, seed=1), feats[:100])


def test_score_images_on_renders_noise_and_wrong_prompts(judges):
    rng = np.random.default_rng(777)
    parsed = random_prompts(500, rng)
    images, prompts = torch.from_numpy(render(parsed, rng)), [p.text for p in parsed]
    real = score_images(images, prompts, judges)
    keys = {"adherence", "acc_color", "acc_shape", "acc_position", "fd"}
    assert set(real) == keys | {f"heldout_{k}" for k in keys}
    assert real["adherence"] >= 0.99 and real["heldout_adherence"] >= 0.99

    noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fake = score_images(noise, prompts, judges)
    for prefix in ("", "heldout_"):
        assert fake[prefix + "fd"] > 20 * real[prefix + "fd"]
        assert fake[prefix + "adherence"] < 0.2

    shuffled = score_images(images, prompts[1:] + prompts[:1], judges)
    assert shuffled["adherence"] < 0.2 and shuffled["fd"] == pytest.approx(real["fd"])


def test_score_images_checks_lengths(judges):
    with pytest.raises(NoiseRefineError, match="prompts"):
        score_images(torch.zeros(3, 3, 16, 16), ["a red circle on the left"] * 2, judges)
