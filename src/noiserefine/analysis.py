"""The analyses of NoiseRefine section 5 / appendix A on any backbone with a refiner:

- how far refined noise moves from its Gaussian input, against two independent Gaussians (Fig. 9a);
- where the change lives in frequency: radial power spectrum of x_hat_T - x_T (Fig. 9b, 16);
- which band carries the benefit: keep only the low (or high) frequencies of the refinement
  (Fig. 15, 17);
- strength control: scaling the residual s in x_T + s * delta (Fig. 13).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from noiserefine.errors import NoiseRefineError
from noiserefine.generation import SamplingOptions, sample_from_noise
from noiserefine.io import OutputFolder, write_json
from noiserefine.methods.refine import NoiseRefiner
from noiserefine.sampling import noise_for_seeds

# Seeds of the random pair x' (Fig. 9a: |x_T - x'| beside the refinement's change) are the analysed
# seeds plus this offset: far enough that x' shares no seed with the analysed noise (the bench's dev
# seeds, 1,000,000 + k), the bench's test seeds (2,000,000 + k) or training targets (0 to ~10^5).
PAIR_SEED_OFFSET = 7_919_000


def radial_power(x: torch.Tensor, bins: int = 8) -> np.ndarray:
    """Mean |FFT|^2 of (B, C, H, W) tensors in `bins` rings of normalised radius (0 = DC, 1 = corner)."""
    spec = torch.fft.fftshift(torch.fft.fft2(x.double()), dim=(-2, -1)).abs().pow(2).mean(dim=(0, 1))
    h, w = spec.shape
    yy, xx = torch.meshgrid(torch.arange(h) - h // 2, torch.arange(w) - w // 2, indexing="ij")
    r = (yy.double() ** 2 + xx.double() ** 2).sqrt()
    r = r / r.max()
    idx = torch.clamp((r * bins).long(), max=bins - 1)
    return np.array([spec[idx == b].mean().item() for b in range(bins)])


def band_pass(x: torch.Tensor, cutoff: float, keep: str) -> torch.Tensor:
    """Keep the frequencies below (`keep="low"`) or above (`"high"`) a normalised radius cutoff."""
    f = torch.fft.fftshift(torch.fft.fft2(x.double()), dim=(-2, -1))
    h, w = x.shape[-2:]
    yy, xx = torch.meshgrid(torch.arange(h) - h // 2, torch.arange(w) - w // 2, indexing="ij")
    r = (yy.double() ** 2 + xx.double() ** 2).sqrt()
    mask = (r / r.max() <= cutoff) if keep == "low" else (r / r.max() > cutoff)
    out = torch.fft.ifft2(torch.fft.ifftshift(f * mask, dim=(-2, -1))).real
    return out.to(x.dtype)


RESULTS = ("analysis.json", "analysis.png")
"""What `run_analysis` writes (`OutputFolder` results)."""


@dataclass
class AnalysisInputs:
    refiner: NoiseRefiner
    prompts: list[str]
    seeds: list[int]
    scorer: Any  # (images, prompts) -> dict with "adherence"


def run_analysis(inputs: AnalysisInputs, out: Path, strengths: Sequence[float] = (0, 0.5, 1, 1.5, 2),
                 cutoffs: Sequence[float] = (0.1, 0.25, 0.5), steps: int = 20, overwrite: bool = False) -> dict[str, Any]:
    """Run all analyses; writes `analysis.json` and `analysis.png` into `out` (a folder holding an
    analysis is refused unless `overwrite`)."""
    folder = OutputFolder(Path(out), RESULTS, overwrite=overwrite).check()
    if not inputs.seeds or len(inputs.seeds) != len(inputs.prompts):
        raise NoiseRefineError(f"the analyses need one prompt per seed and at least one, got "
                               f"{len(inputs.prompts)} prompts and {len(inputs.seeds)} seeds")
    bb = inputs.refiner.backbone
    x_T = noise_for_seeds(inputs.seeds, bb.latent_shape)
    other = noise_for_seeds([s + PAIR_SEED_OFFSET for s in inputs.seeds], bb.latent_shape)
    with torch.no_grad():
        delta = inputs.refiner.delta(x_T, bb.encode_prompts(inputs.prompts))
    opts = SamplingOptions(steps=steps)

    def adherence(noise: torch.Tensor) -> float:
        images = bb.decode(sample_from_noise(bb, noise, inputs.prompts, opts))
        return float(inputs.scorer(images, inputs.prompts)["adherence"])

    result = {
        "mean_abs_change_refined": float(delta.abs().mean()),
        "mean_abs_change_random_pair": float((x_T - other).abs().mean()),
        "radial_power_delta": radial_power(delta).tolist(),
        "radial_power_gaussian": radial_power(x_T).tolist(),
        "strength": {f"{s:g}": adherence(x_T + s * delta) for s in strengths},
        "low_band_only": {f"{c:g}": adherence(x_T + band_pass(delta, c, "low")) for c in cutoffs},
        "high_band_only": {f"{c:g}": adherence(x_T + band_pass(delta, c, "high")) for c in cutoffs},
    }
    out = folder.open()
    write_json(out / "analysis.json", result)
    _plot(result, delta, x_T - other, out / "analysis.png")
    return result


def _plot(result: dict[str, Any], delta: torch.Tensor, random_diff: torch.Tensor, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    ax[0].hist(random_diff.abs().flatten().numpy(), bins=60, alpha=0.6, density=True, label="|x_T - x'| (random)")
    ax[0].hist(delta.abs().flatten().numpy(), bins=60, alpha=0.6, density=True, label="|x_hat_T - x_T| (refined)")
    ax[0].set_title("size of the change (Fig. 9a)")
    ax[0].legend()
    rings = np.arange(len(result["radial_power_delta"])) / len(result["radial_power_delta"])
    ax[1].semilogy(rings, result["radial_power_delta"], "o-", label="refinement delta")
    ax[1].semilogy(rings, result["radial_power_gaussian"], "s--", label="Gaussian noise")
    ax[1].set_xlabel("normalised frequency radius")
    ax[1].set_title("where the change lives (Fig. 9b)")
    ax[1].legend()
    s = result["strength"]
    ax[2].plot([float(k) for k in s], list(s.values()), "o-", label="x_T + s * delta")
    ax[2].set_xlabel("strength s")
    ax[2].set_ylabel("adherence")
    ax[2].set_title("strength control (Fig. 13)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
