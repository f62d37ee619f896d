"""The noise-method protocol: Gaussian x_T in, (better) initial noise out, same shape."""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch


@runtime_checkable
class NoiseMethod(Protocol):
    """A way to choose the initial noise. `extra_nfe` is its cost in denoiser evaluations per
    image, on top of sampling (NoiseRefine: 1; Gaussian: 0; search methods report their own)."""

    name: str
    extra_nfe: float

    def __call__(self, x_T: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor: ...


class GaussianNoise:
    """The baseline: the Gaussian noise itself."""

    name = "gaussian"
    extra_nfe = 0.0

    def __call__(self, x_T: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return x_T


class RefinedNoise:
    """NoiseRefine at inference: x_hat_T = x_T + s * delta_phi(x_T, c), one denoiser evaluation."""

    name = "refined"
    extra_nfe = 1.0

    def __init__(self, refiner, strength: float = 1.0, guidance_scale: float | None = None) -> None:
        self.refiner = refiner
        self.strength = strength
        self.guidance_scale = guidance_scale

    @torch.no_grad()
    def __call__(self, x_T: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        cond = self.refiner.backbone.encode_prompts(prompts)
        return self.refiner(x_T, cond, strength=self.strength, guidance_scale=self.guidance_scale)
