"""Noise Diffusion (Miao et al., "Noise Diffusion for Enhancing Semantic Faithfulness in
Text-to-Image Synthesis", CVPR 2025): training-free optimisation of each image's x_T under a scorer.

One round ("Overall Architecture" of the paper), for the current noise z:

1. sample x_0 from z and score it, s = s(x_0, c). The sampler runs with stop-gradient model outputs
   (`grad_mode="msd"`), so ds/dz costs no extra model evaluation: the paper's approximation of
   treating epsilon_theta as a constant.
2. adaptive step ("VQA-score adaptive step size"): gamma = 1 - sqrt(s), clipped to
   [gamma_min, gamma_max] so a hopeless image is not fully resampled and a good one still moves.
3. gradient-guided selection among K candidates sigma_i ~ N(0, I):
   sigma* = argmax_i  grad . v_i / ||v_i||^2,  with v_i = (sqrt(1 - gamma) - 1) z + sqrt(gamma) sigma_i.
4. distribution-preserving update: z' = sqrt(1 - gamma) z + sqrt(gamma) sigma*. Since
   (sqrt(1 - gamma))^2 + (sqrt(gamma))^2 = 1, z' ~ N(0, I) whenever z and sigma* are.
   `NoiseDiffusionConfig.update="linear"` is the plain update the paper argues against (its
   "Key Insight"), for ablation: z' = (1 - gamma) z + gamma sigma*, whose variance
   (1 - gamma)^2 + gamma^2 < 1 shrinks the noise off N(0, I); step 3's v_i follows the update used.

An image stops at a score threshold or after a round budget; the BEST noise seen is returned with
its score (later rounds can be worse). Each round costs one scorer call and one sampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from noiserefine.backbones.base import Backbone, select_cond
from noiserefine.errors import NoiseRefineError
from noiserefine.generation import SamplingOptions, progress_note
from noiserefine.methods.search import Candidates, SearchResult, SearchStats, encode, sample_and_score
from noiserefine.sampling import check_noise
from noiserefine.scoring import Scorer


UPDATES = ("preserving", "linear")
"""Noise updates: the paper's distribution-preserving one, and the plain (variance-changing) ablation."""


@dataclass(frozen=True)
class NoiseDiffusionConfig:
    """Round budget M, candidates per round K, early-stop threshold, the step-size clip and the
    noise update ("preserving", the paper's; "linear", the variance-changing ablation)."""

    rounds: int = 10
    candidates: int = 16
    threshold: float = 0.999
    gamma_min: float = 0.05
    gamma_max: float = 0.9
    update: str = "preserving"

    def __post_init__(self) -> None:
        if self.update not in UPDATES:
            raise NoiseRefineError(f"unknown Noise Diffusion update {self.update!r}; choose from {', '.join(UPDATES)}")
        if self.rounds < 1 or self.candidates < 1:
            raise NoiseRefineError(f"rounds and candidates must be >= 1, got {self.rounds}, {self.candidates}")
        if not 0 < self.gamma_min <= self.gamma_max <= 1:
            raise NoiseRefineError(f"need 0 < gamma_min <= gamma_max <= 1, got {self.gamma_min}, {self.gamma_max}")


def update_weights(g: torch.Tensor, update: str = "preserving") -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) of the update z' = a z + b sigma at step g: "preserving" (sqrt(1 - g), sqrt(g)),
    a^2 + b^2 = 1; "linear" (1 - g, g), a^2 + b^2 < 1 for 0 < g < 1."""
    return ((1 - g).sqrt(), g.sqrt()) if update == "preserving" else (1 - g, g)


def noise_update(z: torch.Tensor, sigma: torch.Tensor, gamma: torch.Tensor, update: str = "preserving") -> torch.Tensor:
    """z' = a z + b sigma with (a, b) = `update_weights(gamma, update)`, gamma per image (B,)."""
    a, b = update_weights(gamma.reshape(-1, *[1] * (z.ndim - 1)).to(z.dtype), update)
    return a * z + b * sigma


def distribution_preserving_update(z: torch.Tensor, sigma: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """z' = sqrt(1 - gamma) z + sqrt(gamma) sigma, gamma per image (B,): N(0, I) in, N(0, I) out."""
    return noise_update(z, sigma, gamma, "preserving")


def adaptive_step(score: torch.Tensor, gamma_min: float, gamma_max: float) -> torch.Tensor:
    """gamma = 1 - sqrt(s): large steps for poor images, small ones for good images."""
    return (1 - score.sqrt()).clamp(gamma_min, gamma_max)


def select_candidate(z: torch.Tensor, grad: torch.Tensor, candidates: torch.Tensor, gamma: torch.Tensor,
                     update: str = "preserving") -> torch.Tensor:
    """The candidate (B, K, ...) -> (B, ...) whose update direction v_i = z'_i - z best follows the gradient."""
    a, b = update_weights(gamma.reshape(-1, 1, *[1] * (z.ndim - 1)).to(z.dtype), update)
    v = (a - 1) * z[:, None] + b * candidates
    alignment = (v * grad[:, None]).flatten(2).sum(-1) / v.flatten(2).pow(2).sum(-1)
    return candidates[torch.arange(len(z), device=z.device), alignment.argmax(1)]


def optimize_noise(backbone: Backbone, scorer: Scorer, x_T: torch.Tensor, prompts: Sequence[str],
                   config: NoiseDiffusionConfig = NoiseDiffusionConfig(),
                   sampling: SamplingOptions = SamplingOptions(), progress: bool = False) -> SearchResult:
    """Noise Diffusion on a batch: per image, the best noise found, its score and its rounds.

    Args:
        scorer: differentiable (images in [-1, 1], prompts) -> (B,) scores in [0, 1].
        x_T: (B, *latent_shape) Gaussian starting noise (round 1 scores x_T itself).
        sampling: how each noise is sampled before scoring (use the guidance you sample with).
    """
    check_noise(x_T, backbone.latent_shape)
    cond, uncond = encode(backbone, prompts, sampling)
    candidates = Candidates(x_T)
    z = x_T.detach().clone()
    best, best_score = z.clone(), torch.full((len(z),), -torch.inf, device=z.device)
    rounds = torch.zeros(len(z), dtype=torch.long)
    active = torch.arange(len(z), device=z.device)
    bar = tqdm(range(1, config.rounds + 1), disable=not progress, desc="noise diffusion", leave=False)
    for k in bar:
        progress_note(f"search round {k}/{config.rounds}: {len(active)} of {len(z)} images searching")
        z_a = z[active].requires_grad_(True)
        with torch.enable_grad():  # the search needs ds/dz even when called under no_grad
            score = sample_and_score(backbone, scorer, z_a, select_cond(cond, active), select_cond(uncond, active),
                                     [prompts[i] for i in active.tolist()], sampling, grad_mode="msd")
        _check_scores(score)
        rounds[active.cpu()] += 1
        better = score.detach() > best_score[active]
        best[active[better]], best_score[active[better]] = z_a.detach()[better], score.detach()[better]
        go_on = score.detach() < config.threshold
        bar.set_postfix(active=int(go_on.sum()), best=f"{best_score.mean().item():.3f}")
        if k == config.rounds or not bool(go_on.any()):
            break
        grad = torch.autograd.grad(score[go_on].sum(), z_a)[0][go_on]  # images do not interact
        s, z_old = score.detach()[go_on], z_a.detach()[go_on]
        active = active[go_on]
        gamma = adaptive_step(s, config.gamma_min, config.gamma_max)
        pool = candidates.draw(active.tolist(), config.candidates).to(z.device, z.dtype)
        chosen = select_candidate(z_old, grad, pool, gamma, config.update)
        z[active] = noise_update(z_old, chosen, gamma, config.update)
    return SearchResult(best, best_score, rounds)


def _check_scores(score: torch.Tensor) -> None:
    if not score.requires_grad:
        raise NoiseRefineError("Noise Diffusion needs a scorer that is differentiable w.r.t. the images")
    if bool(((score < 0) | (score > 1)).any()):
        raise NoiseRefineError("Noise Diffusion's adaptive step 1 - sqrt(s) needs scores in [0, 1]; "
                               f"got range [{score.min().item():.3g}, {score.max().item():.3g}]")


class NoiseDiffusion:
    """Noise Diffusion as a noise method: `NoiseDiffusion(backbone, scorer)(x_T, prompts)` -> best noise.

    Args:
        scorer: differentiable (images, prompts) -> (B,) scores in [0, 1] (shapes16: the primary
            judge's prompt probability, the analogue of the paper's VQA score P("Yes" | image, prompt)).
        config: rounds, candidates, threshold, step clip.
        sampling: guidance, steps and scheduler used to score a noise; sample the result the same way.
    `stats` holds the running averages the bench reports (rounds, scorer calls and model
    evaluations per image); `extra_nfe` is the running average of model evaluations per image.
    """

    name = "noise-diffusion"

    def __init__(self, backbone: Backbone, scorer: Scorer, config: NoiseDiffusionConfig = NoiseDiffusionConfig(),
                 sampling: SamplingOptions = SamplingOptions(), progress: bool = False) -> None:
        self.backbone, self.scorer, self.config, self.sampling = backbone, scorer, config, sampling
        self.progress = progress
        self.run_stats = SearchStats()

    @property
    def extra_nfe(self) -> float:
        return self.run_stats.nfe_per_image

    @property
    def stats(self) -> dict[str, float]:
        return self.run_stats.as_dict()

    def __call__(self, x_T: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        result = optimize_noise(self.backbone, self.scorer, x_T, prompts, self.config, self.sampling, self.progress)
        calls = int(result.rounds.sum())
        self.run_stats.add(result.rounds, calls, calls * self.sampling.nfe, result.score)
        return result.noise.detach()
