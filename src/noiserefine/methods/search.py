"""Search over initial noise under a scorer: best-of-N random search, and the pieces every search
method shares (sampling a candidate noise and scoring its image, per-sample candidate streams,
per-run statistics). Noise Diffusion (`noise_diffusion.py`) is the guided search built on them.

Best-of-N is the baseline Noise Diffusion must beat at an equal scorer budget ("Random Sampling"
in its ablation): draw N noises per image (the given x_T is candidate 0), sample each the same
way, keep the noise whose image the scorer likes best.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import torch

from noiserefine.backbones.base import Backbone, Cond
from noiserefine.errors import NoiseRefineError
from noiserefine.generation import SamplingOptions, progress_note
from noiserefine.guidance import conditioning
from noiserefine.sampling import GradMode, check_noise, denoise, make_scheduler
from noiserefine.scoring import Scorer


class Candidates:
    """One random stream per image, seeded by a hash of that image's x_T: the noises drawn for an
    image do not depend on its batch (as EDM2's one generator per sample)."""

    def __init__(self, x_T: torch.Tensor) -> None:
        self.shape = tuple(x_T.shape[1:])
        self.generators = [torch.Generator().manual_seed(_noise_hash(x)) for x in x_T]

    def draw(self, rows: Sequence[int], count: int) -> torch.Tensor:
        """(len(rows), count, *shape) fresh standard-normal noises for images `rows`."""
        return torch.stack([torch.randn((count, *self.shape), generator=self.generators[r]) for r in rows])


def _noise_hash(x: torch.Tensor) -> int:
    data = x.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return int.from_bytes(hashlib.sha256(data).digest()[:7], "little")


def sample_and_score(backbone: Backbone, scorer: Scorer, z: torch.Tensor, cond: Cond, uncond: Cond | None,
                     prompts: Sequence[str], sampling: SamplingOptions, grad_mode: GradMode = "none") -> torch.Tensor:
    """(B,) scores of the images sampled from noise `z`. With grad_mode="msd" the scores keep a
    graph back to `z` through the sampler's update algebra (model outputs stop-gradient)."""
    sched = make_scheduler(sampling.scheduler, backbone.scheduler_config)
    x_0 = denoise(backbone, sched, z, cond, steps=sampling.steps, uncond=uncond, guidance=sampling.guidance,
                  grad_mode=grad_mode)
    scores = scorer(backbone.decode(x_0), prompts)
    if scores.shape != (z.shape[0],):
        raise NoiseRefineError(f"the scorer must return one score per image, shape ({z.shape[0]},), got {tuple(scores.shape)}")
    return scores.float()


@torch.no_grad()
def encode(backbone: Backbone, prompts: Sequence[str], sampling: SamplingOptions) -> tuple[Cond, Cond | None]:
    """Conditioning of `prompts` and, when CFG is on, of the empty prompt (constants of the search)."""
    cond = conditioning(backbone, list(prompts), sampling.guidance)
    uncond = backbone.encode_prompts([""] * len(prompts)) if sampling.guidance.uses_uncond else None
    return cond, uncond


class SearchStats:
    """Running totals over every image a method has handled (the bench reads `as_dict()`)."""

    def __init__(self) -> None:
        self.images = 0
        self.rounds = 0
        self.scorer_calls = 0
        self.nfe = 0
        self.best_score_sum = 0.0

    def add(self, rounds: torch.Tensor, scorer_calls: int, nfe: int, best: torch.Tensor) -> None:
        self.images += len(rounds)
        self.rounds += int(rounds.sum())
        self.scorer_calls += scorer_calls
        self.nfe += nfe
        self.best_score_sum += float(best.sum())

    @property
    def nfe_per_image(self) -> float:
        return self.nfe / max(self.images, 1)

    def as_dict(self) -> dict[str, float]:
        n = max(self.images, 1)
        return {"avg_rounds": self.rounds / n, "scorer_calls_per_image": self.scorer_calls / n,
                "method_nfe_per_image": self.nfe / n, "avg_best_score": self.best_score_sum / n,
                "images_searched": float(self.images)}


@dataclass
class SearchResult:
    """Per image: the best noise found, its score and the rounds (scorer calls) it took."""

    noise: torch.Tensor
    score: torch.Tensor
    rounds: torch.Tensor


@torch.no_grad()
def best_of_n(backbone: Backbone, scorer: Scorer, x_T: torch.Tensor, prompts: Sequence[str], n: int,
              sampling: SamplingOptions = SamplingOptions()) -> SearchResult:
    """Random search: x_T and n - 1 fresh noises per image, each sampled and scored; keep the argmax.

    Costs n scorer calls and n * sampling.nfe denoiser evaluations per image.
    """
    check_noise(x_T, backbone.latent_shape)
    if n < 1:
        raise NoiseRefineError(f"best-of-n needs n >= 1 candidates, got {n}")
    cond, uncond = encode(backbone, prompts, sampling)
    rows = list(range(len(x_T)))
    fresh = Candidates(x_T).draw(rows, n - 1).to(x_T.device, x_T.dtype)
    best, best_score = x_T.clone(), torch.full((len(x_T),), -torch.inf, device=x_T.device)
    for k in range(n):
        progress_note(f"candidate {k + 1}/{n}")
        z = x_T if k == 0 else fresh[:, k - 1]
        score = sample_and_score(backbone, scorer, z, cond, uncond, prompts, sampling)
        better = score > best_score
        best[better], best_score[better] = z[better], score[better]
    return SearchResult(best, best_score, torch.full((len(x_T),), n))


class BestOfN:
    """Best-of-N as a noise method: `BestOfN(backbone, scorer, n=8)(x_T, prompts)` -> best noise.

    Args:
        scorer: (images in [-1, 1], prompts) -> (B,) score, higher is better (shapes16: the primary
            judge's prompt probability).
        n: candidates per image, the scorer budget (bench: Noise Diffusion's scorer calls per image).
        sampling: guidance, steps and scheduler of the samples that are scored; use the ones you
            will sample with, so the chosen noise's image is the one that was scored.
    """

    name = "best-of-n"

    def __init__(self, backbone: Backbone, scorer: Scorer, n: int = 8,
                 sampling: SamplingOptions = SamplingOptions()) -> None:
        if n < 1:
            raise NoiseRefineError(f"best-of-n needs n >= 1 candidates, got {n}")
        self.backbone, self.scorer, self.n, self.sampling = backbone, scorer, n, sampling
        self.run_stats = SearchStats()

    @property
    def extra_nfe(self) -> float:
        return float(self.n * self.sampling.nfe)

    @property
    def stats(self) -> dict[str, float]:
        return self.run_stats.as_dict()

    def __call__(self, x_T: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        result = best_of_n(self.backbone, self.scorer, x_T, prompts, self.n, self.sampling)
        self.run_stats.add(result.rounds, self.n * len(x_T), self.n * self.sampling.nfe * len(x_T), result.score)
        return result.noise
