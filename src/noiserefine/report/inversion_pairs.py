"""Initial noise vs the inversion noise of its guided image (NoiseRefine section 3.1, Fig. 3; the
inversion error of Fig. 4): for targets (x_T, c, x_0^Guide), x_T^Guide = DDIM-Inversion(x_0^Guide)
unguided in N steps -- the noise-space loss's regression target (`train.py`, loss "noise").

`pair_statistics` compares |x_T - x_T^Guide| with |x_T - x_T'| for random pairs of noises and
with unpaired (x_T', x_T^Guide) (Fig. 3a), the power of the differences per spatial frequency
(Fig. 3b, as a radial profile), and how well x_T^Guide reproduces x_0^Guide when sampled
unguided (Fig. 4).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from noiserefine.backbones.base import Backbone
from noiserefine.generation import SamplingOptions, sample_from_noise
from noiserefine.inversion import ddim_invert
from noiserefine.targets import TargetSet

HIST_EDGES = np.linspace(0.0, 5.0, 51)  # |difference| bins of Fig. 3a (unit-variance noise: random pairs ~ |N(0, 2)|)
LOW_FREQUENCY = 0.125  # cycles per pixel: "low" is the lowest quarter of the 0-0.5 range (Nyquist)


@torch.no_grad()
def inversion_pairs(backbone: Backbone, data: TargetSet, count: int, steps: int = 10,
                    batch: int = 64) -> dict[str, torch.Tensor]:
    """The first `count` targets' x_T, x_0^Guide, their inversion noise x_T^Guide (`steps` unguided
    DDIM-inversion steps), and the unguided `steps`-step samples of x_T^Guide and of x_T."""
    out: dict[str, list[torch.Tensor]] = {"x_T": [], "x_0": [], "inverted": [], "reconstructed": [], "plain": []}
    options = SamplingOptions(steps=steps)
    for lo in range(0, min(count, len(data)), batch):
        hi = min(lo + batch, count, len(data))
        prompts = data.prompts[lo:hi]
        x_T, x_0 = data.x_T[lo:hi], data.x_0[lo:hi]
        inverted = ddim_invert(backbone, x_0, backbone.encode_prompts(prompts), steps=steps)
        out["x_T"].append(x_T)
        out["x_0"].append(x_0)
        out["inverted"].append(inverted)
        out["reconstructed"].append(sample_from_noise(backbone, inverted, prompts, options))
        out["plain"].append(sample_from_noise(backbone, x_T, prompts, options))
    return {k: torch.cat(v) for k, v in out.items()}


def radial_power(diff: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean power |F(diff)|^2 / pixels per radial frequency band (width 1/H cycles per pixel),
    averaged over images and channels: (band centres in cycles/pixel, power). White noise of
    variance v has power v in every band."""
    h = diff.shape[-1]
    power = torch.fft.fft2(diff.double()).abs().pow(2).mean(dim=(0, 1)) / (h * h)
    f = torch.fft.fftfreq(h, dtype=torch.float64)
    radius = torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    band = torch.clamp((radius * h).round().long(), max=h // 2)
    totals = torch.zeros(h // 2 + 1, dtype=torch.float64).index_add_(0, band.flatten(), power.flatten())
    counts = torch.zeros(h // 2 + 1, dtype=torch.float64).index_add_(0, band.flatten(), torch.ones(h * h, dtype=torch.float64))
    return (torch.arange(h // 2 + 1) / h).numpy(), (totals / counts).numpy()


def _low_frequencies(h: int) -> torch.Tensor:
    """(h, h) mask of the 2-D frequencies at most LOW_FREQUENCY cycles per pixel from zero."""
    f = torch.fft.fftfreq(h, dtype=torch.float64)
    return torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2) <= LOW_FREQUENCY


def _low_share(diff: torch.Tensor) -> float:
    """Fraction of the difference's power at spatial frequencies <= LOW_FREQUENCY."""
    power = torch.fft.fft2(diff.double()).abs().pow(2).sum(dim=(0, 1))
    return float(power[_low_frequencies(diff.shape[-1])].sum() / power.sum())


def _low_share_per_image(diff: torch.Tensor) -> torch.Tensor:
    """(N,) each image's fraction of its difference's power at frequencies <= LOW_FREQUENCY."""
    power = torch.fft.fft2(diff.double()).abs().pow(2).sum(dim=1)
    return power[:, _low_frequencies(diff.shape[-1])].sum(1) / power.flatten(1).sum(1)


def _paired_gain(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Mean of a - b over targets and its standard error."""
    d = (a - b).double()
    return float(d.mean()), float(d.std() / len(d) ** 0.5) if len(d) > 1 else float("nan")


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).pow(2).mean())


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def pair_statistics(pairs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Fig. 3's statistics of three kinds of pairs: "inversion" (x_T^Guide - x_T of one target),
    "random" (two Gaussian noises, x_T' - x_T: the paper's reference) and "mismatched" (x_T^Guide of
    one target - x_T of another: the same two distributions without the pairing, the fair reference
    when the inversion noise is not unit-variance). For each: the |difference| histogram (density
    per bin, Fig. 3a), mean |difference|, radial power profile (Fig. 3b) and share of power at
    frequencies <= LOW_FREQUENCY (white noise: the share of such frequencies). Per target, paired
    against the unpaired reference (mean and standard error over targets): how much nearer x_T^Guide
    is to its own x_T (`closer_than_unpaired`, mean |difference|) and how much more of the
    difference's power is low (`low_share_gain`). Also the pixel correlation of x_T and x_T^Guide,
    the inversion noise's std and the inversion error of Fig. 4 (MSE of x_T^Guide's unguided sample
    to x_0^Guide, beside that of x_T's own unguided sample)."""
    x_T, inverted = pairs["x_T"].double(), pairs["inverted"].double()
    other = x_T.roll(1, 0)  # another target's noise (a different seed)
    diffs = {"inversion": inverted - x_T, "random": other - x_T, "mismatched": inverted - other}
    stats: dict[str, Any] = {"n": len(x_T), "hist_edges": HIST_EDGES.tolist(), "low_frequency": LOW_FREQUENCY,
                             "low_share_white": float(_low_frequencies(x_T.shape[-1]).double().mean())}
    for kind, diff in diffs.items():
        frequency, power = radial_power(diff)
        stats |= {f"hist_{kind}": np.histogram(diff.abs().numpy(), HIST_EDGES, density=True)[0].tolist(),
                  f"mean_abs_{kind}": float(diff.abs().mean()), f"power_{kind}": power.tolist(),
                  f"low_share_{kind}": _low_share(diff), "frequency": frequency.tolist()}
    closer = _paired_gain(diffs["mismatched"].abs().flatten(1).mean(1), diffs["inversion"].abs().flatten(1).mean(1))
    lower = _paired_gain(_low_share_per_image(diffs["inversion"]), _low_share_per_image(diffs["mismatched"]))
    return stats | {
        "closer_than_unpaired": closer[0], "closer_than_unpaired_se": closer[1],
        "low_share_gain": lower[0], "low_share_gain_se": lower[1],
        "correlation": _correlation(x_T, inverted), "correlation_mismatched": _correlation(other, inverted),
        "inversion_std": float(inverted.std()),
        "reconstruction_mse": _mse(pairs["reconstructed"], pairs["x_0"]), "plain_mse": _mse(pairs["plain"], pairs["x_0"]),
    }
