"""Tools of NoiseRefine's section 5 / appendix A analyses, on any backbone (`noiserefine report`
runs them on the shipped refiner, `noiserefine.report.analysis_items`):

- where a change to the noise lives in frequency: radial power spectrum (Fig. 9b, 16) and ideal
  band filters on the normalised radius (Fig. 15, 17, 18);
- spherical interpolation between two noises (Fig. 22; Song et al. 2020, DDIM section 5.4);
- x0-predictions along a sampler's trajectory (Fig. 11).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from noiserefine.backbones.base import Backbone
from noiserefine.errors import NoiseRefineError
from noiserefine.generation import SamplingOptions
from noiserefine.guidance import conditioning
from noiserefine.sampling import denoise, make_scheduler

# Seeds of a second, independent Gaussian (the random pair x' of Fig. 9a, the fresh noise that
# re-draws a band in Fig. 18, the far end of an interpolation in Fig. 22) are the analysed seeds plus
# this offset: far enough that x' shares no seed with the analysed noise (the bench's dev seeds,
# 1,000,000 + k), the bench's test seeds (2,000,000 + k) or training targets (0 to ~10^5).
PAIR_SEED_OFFSET = 7_919_000


def _radius(h: int, w: int) -> torch.Tensor:
    """Distance of each (fftshift-ed) frequency from DC, normalised so the corner is 1."""
    yy, xx = torch.meshgrid(torch.arange(h) - h // 2, torch.arange(w) - w // 2, indexing="ij")
    r = (yy.double() ** 2 + xx.double() ** 2).sqrt()
    return r / r.max()


def radial_power(x: torch.Tensor, bins: int = 8) -> np.ndarray:
    """Mean |FFT|^2 of (B, C, H, W) tensors in `bins` rings of normalised radius (0 = DC, 1 = corner)."""
    spec = torch.fft.fftshift(torch.fft.fft2(x.double()), dim=(-2, -1)).abs().pow(2).mean(dim=(0, 1))
    idx = torch.clamp((_radius(*spec.shape) * bins).long(), max=bins - 1)
    return np.array([spec[idx == b].mean().item() for b in range(bins)])


def keep_band(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """The part of (..., H, W) tensors whose frequencies have normalised radius in (lo, hi] (an
    ideal band filter; the DC term belongs to every band with lo = 0). Bands that tile [0, 1] add up
    to `x`: keep_band(x, 0, c) + keep_band(x, c, 1) == x."""
    if not 0.0 <= lo < hi:
        raise NoiseRefineError(f"a frequency band needs 0 <= lo < hi, got ({lo}, {hi}]")
    f = torch.fft.fftshift(torch.fft.fft2(x.double()), dim=(-2, -1))
    r = _radius(*x.shape[-2:])
    mask = (r <= hi) & ((r > lo) if lo > 0 else torch.ones_like(r, dtype=torch.bool))
    return torch.fft.ifft2(torch.fft.ifftshift(f * mask, dim=(-2, -1))).real.to(x.dtype)


def energy_below(x: torch.Tensor, cutoffs: Sequence[float]) -> list[float]:
    """Share of the energy (squared norm) of `x` at normalised radius <= each cutoff (Fig. 16)."""
    total = float(x.double().pow(2).sum())
    return [float(keep_band(x, 0.0, c).double().pow(2).sum()) / total for c in cutoffs]


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation between noises a and b (per sample, over all other dimensions), the
    path DDIM (section 5.4) and NoiseRefine Fig. 22 interpolate along: t = 0 gives a, t = 1 gives b."""
    fa, fb = a.flatten(1).double(), b.flatten(1).double()
    cos = (fa * fb).sum(1) / (fa.norm(dim=1) * fb.norm(dim=1))
    theta = torch.arccos(cos.clamp(-1.0, 1.0))[:, None]
    mixed = (torch.sin((1 - t) * theta) * fa + torch.sin(t * theta) * fb) / torch.sin(theta)
    return mixed.reshape(a.shape).to(a.dtype)


class _X0Recorder:
    """The wrapped scheduler, except that each step keeps its x0-prediction (pred_original_sample)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.x0: list[torch.Tensor] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def step(self, model_output: torch.Tensor, t: torch.Tensor, x: torch.Tensor, return_dict: bool = True) -> Any:
        out = self.inner.step(model_output, t, x, return_dict=True)
        if getattr(out, "pred_original_sample", None) is None:
            raise NoiseRefineError(f"{type(self.inner).__name__} gives no x0-prediction per step; use ddim or euler")
        self.x0.append(out.pred_original_sample)
        return out if return_dict else (out.prev_sample,)


@torch.no_grad()
def x0_trajectory(backbone: Backbone, x_T: torch.Tensor, prompts: Sequence[str],
                  options: SamplingOptions) -> torch.Tensor:
    """(steps, B, *latent_shape): the sampler's x0-prediction at each step, t from T down to 0, of
    the same sampling as `generation.sample_from_noise` (NoiseRefine Fig. 11). The last entry is the
    final x0-prediction, not the sample itself."""
    cond = conditioning(backbone, prompts, options.guidance)
    uncond = backbone.encode_prompts([""] * len(prompts)) if options.guidance.uses_uncond else None
    recorder = _X0Recorder(make_scheduler(options.scheduler, backbone.scheduler_config))
    denoise(backbone, recorder, x_T, cond, uncond=uncond, guidance=options.guidance, steps=options.steps)
    return torch.stack(recorder.x0)
