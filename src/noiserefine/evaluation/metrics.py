"""Benchmark figures (docs/world.md section 6): prompt adherence, per-attribute accuracy and the
Frechet distance of judge features against 2,000 fixed real renders.

The Frechet distance between Gaussians N(mu_a, S_a) and N(mu_b, S_b) is
||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))  (Dowson & Landau 1982; FID, Heusel et al. 2017).
"""

from __future__ import annotations

import weakref
from typing import Sequence

import numpy as np
import torch

from noiserefine.errors import NoiseRefineError
from noiserefine.evaluation.judge import Judge, attribute_accuracy
from noiserefine.world.shapes16 import random_prompts, render

REFERENCE_SIZE = 2000
REFERENCE_SEED = 271828  # fixed: every run compares against the same real renders
_BATCH = 500
_reference_cache: weakref.WeakKeyDictionary[Judge, dict[tuple[int, int, str], np.ndarray]] = weakref.WeakKeyDictionary()


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two (N, D) feature sets (N >= 2 each)."""
    a, b = np.asarray(feats_a, dtype=np.float64), np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise NoiseRefineError(
            f"Frechet distance needs two (N >= 2, D) feature arrays of equal D, got {a.shape} and {b.shape}"
        )
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise NoiseRefineError("Frechet distance: features contain NaN or inf")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr((S_a S_b)^(1/2)) = Tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)): the symmetric form has real
    # eigenvalues by construction, so no imaginary rounding residue (as scipy's sqrtm of S_a S_b
    # leaves) and it stays exact when a covariance is singular (fewer images than D).
    root_a = _psd_sqrt(cov_a)
    trace_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0.0, None)).sum()
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_covmean)


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    """Symmetric square root of a covariance (rounding's tiny negative eigenvalues set to 0)."""
    w, v = np.linalg.eigh(cov)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


@torch.no_grad()
def judge_features(judge: Judge, images: torch.Tensor) -> np.ndarray:
    """(N, D) float64 judge features, computed in batches."""
    return np.concatenate([judge.features(chunk).double().numpy() for chunk in images.split(_BATCH)])


def reference_features(judge: Judge, n: int = REFERENCE_SIZE, seed: int = REFERENCE_SEED,
                       variant: str = "original") -> np.ndarray:
    """Features of `n` fixed real renders (uniform prompts from `seed`) of the world `variant`
    (the same scenes in another palette: `world.shapes16.WORLD_VARIANTS`), cached per judge."""
    cache = _reference_cache.setdefault(judge, {})
    if (n, seed, variant) not in cache:
        rng = np.random.default_rng(seed)
        images = torch.from_numpy(render(random_prompts(n, rng), rng, variant))
        cache[(n, seed, variant)] = judge_features(judge, images)
    return cache[(n, seed, variant)]


def score_images(images: torch.Tensor, prompts: Sequence[str], judges: dict[str, Judge],
                 variant: str = "original") -> dict[str, float]:
    """Adherence, per-attribute accuracy and FD for each judge, in one flat JSON-friendly dict
    (FD against the renders of the world `variant`: a model fine-tuned on "shifted" is measured
    against its own world).

    The judge named "primary" gives un-prefixed keys ({"adherence", "acc_color", "acc_shape",
    "acc_position", "fd"}); any other judge `name` gives the same keys prefixed `"{name}_"`.

    Args:
        images: (N, 3, 16, 16) in [-1, 1], N >= 2 (FD needs a covariance).
        prompts: N shapes16 prompts, one per image.
        judges: e.g. `load_judges()`.
    """
    if len(prompts) != len(images):
        raise NoiseRefineError(f"got {len(images)} images but {len(prompts)} prompts")
    scores: dict[str, float] = {}
    for name, judge in judges.items():
        prefix = "" if name == "primary" else f"{name}_"
        figures = attribute_accuracy(judge, images, prompts)
        figures["fd"] = frechet_distance(judge_features(judge, images), reference_features(judge, variant=variant))
        scores |= {prefix + key: value for key, value in figures.items()}
    return scores
