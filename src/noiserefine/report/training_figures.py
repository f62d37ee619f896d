"""The pictures of the report's training ablations (matplotlib, Agg): score bars with standard
errors (Tab. 1, 14, 15), the inversion-noise analysis (Fig. 3), and the noise-optimisation curves
and per-step gradient maps (Figs. 6, 35, 36). Each function writes one PNG and returns its path."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

MODE_COLOURS = {"msd": "tab:blue", "full": "tab:orange"}  # the paper's Fig. 6 colours
MODE_LABELS = {"msd": "MSD (stop-gradient, Eq. 5)", "full": "full gradient (Eq. 3)"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def score_bars(path: Path, rows: Sequence[dict[str, Any]], labels: Sequence[str], title: str) -> Path:
    """Adherence (both judges, binomial SE), FD (both judges, bootstrap SE) and the MSE to the
    teacher's image (SE over images) per row."""
    plt = _pyplot()
    fig, (adh, fd, mse) = plt.subplots(1, 3, figsize=(14, 4.2))
    x, width = np.arange(len(rows)), 0.38
    for k, (prefix, judge) in enumerate((("", "primary judge"), ("heldout_", "held-out judge"))):
        adh.bar(x + (k - 0.5) * width, [r[prefix + "adherence"] for r in rows], width,
                yerr=[r[prefix + "adherence_se"] for r in rows], capsize=3, label=judge)
        fd.bar(x + (k - 0.5) * width, [r[prefix + "fd"] for r in rows], width,
               yerr=[r[prefix + "fd_se"] for r in rows], capsize=3, label=judge)
    mse.bar(x, [r["teacher_mse_mean"] for r in rows], 2 * width, yerr=[r["teacher_mse_se"] for r in rows], capsize=3,
            color="tab:green", label="per-image MSE, mean")
    for ax, name in ((adh, "prompt adherence (higher is better)"), (fd, "FD to real renders (lower is better)"),
                     (mse, "MSE to the teacher's image (lower is better)")):
        ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=7)
        ax.set_ylabel(name)
        ax.legend(fontsize=8)
    low = min(min(r["adherence"], r["heldout_adherence"]) for r in rows)
    adh.set_ylim(max(0.0, low - 0.15), 1)  # the axis starts above 0: differences of a few points stay visible
    fig.suptitle(title + f" (n = {rows[0]['n']} images per row; bars: 1 SE)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


PAIRS = {"inversion": ("tab:blue", "x_T vs its own inversion noise x_T^Guide"),
         "random": ("tab:orange", "x_T vs another Gaussian noise x_T'"),
         "mismatched": ("tab:green", "x_T' vs the inversion noise of another target")}


def inversion_figure(path: Path, stats: dict[str, Any]) -> Path:
    """Fig. 3: (a) pixel-wise |difference| histograms of the three kinds of pairs; (b) the power of
    each difference by spatial frequency."""
    plt = _pyplot()
    fig, (hist, spec) = plt.subplots(1, 2, figsize=(10, 3.8))
    edges = np.array(stats["hist_edges"])
    centres = (edges[:-1] + edges[1:]) / 2
    for kind, (colour, label) in PAIRS.items():
        hist.plot(centres, stats[f"hist_{kind}"], color=colour, label=label)
        spec.plot(stats["frequency"], stats[f"power_{kind}"], "o-", color=colour, label=label)
    hist.set_xlabel("pixel-wise |difference|")
    hist.set_ylabel("density")
    hist.set_title("(a) size of the difference", fontsize=9)
    hist.legend(fontsize=7)
    spec.set_yscale("log")
    spec.set_xlabel("spatial frequency (cycles per pixel)")
    spec.set_ylabel("mean power of the difference")
    spec.set_title("(b) where the difference lies in frequency", fontsize=9)
    spec.legend(fontsize=7)
    fig.suptitle(f"Fig. 3: initial noise vs inversion noise of its guided image (n = {stats['n']} targets)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def optimisation_curves(path: Path, runs: dict[str, dict[str, Any]]) -> Path:
    """Figs. 6 / 35: loss and gradient norm at x_T over iterations, one thin line per noise and the
    mean in bold, MSD vs full gradient."""
    plt = _pyplot()
    fig, (loss_ax, grad_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    for mode, run in runs.items():
        loss, grad = np.array(run["loss"]), np.array(run["grad_norm"])
        it = np.arange(len(loss))
        for ax, values in ((loss_ax, loss), (grad_ax, grad)):
            ax.plot(it, values, color=MODE_COLOURS[mode], alpha=0.25, linewidth=0.8)
            ax.plot(it, values.mean(1), color=MODE_COLOURS[mode], linewidth=2, label=MODE_LABELS[mode] + ", mean")
    loss_ax.set_ylabel("MSE of the sample to the guided target")
    grad_ax.set_ylabel("||gradient at x_T||")
    for ax in (loss_ax, grad_ax):
        ax.set_xlabel("optimisation iteration (Adam on x_T)")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    first = next(iter(runs.values()))
    fig.suptitle(f"Figs. 6 / 35: optimising x_T directly, {len(first['loss'][0])} noises, "
                 f"{first['steps']}-step unguided DDIM, lr {first['lr']:g}", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def state_gradient_maps(path: Path, runs: dict[str, dict[str, Any]]) -> Path:
    """Fig. 36: ||dL/dx_t||^2 at every sampler state (x_T to x_0) and iteration, one map per mode,
    and its median and maximum over iterations per state."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(runs) + 1, figsize=(5 * (len(runs) + 1), 4.0), layout="constrained")
    values = {mode: np.log10(np.maximum(np.array(run["state_grad_sq"]), 1e-30)) for mode, run in runs.items()}
    lo, hi = min(v.min() for v in values.values()), max(v.max() for v in values.values())
    profile = axes[-1]
    for ax, (mode, v) in zip(axes, values.items()):
        image = ax.imshow(v, aspect="auto", origin="lower", vmin=lo, vmax=hi, cmap="viridis")
        n = v.shape[1] - 1
        ax.set_xticks([0, n], ["x_T", "x_0"])
        ax.set_xlabel(f"sampler state ({n} steps)")
        ax.set_ylabel("optimisation iteration")
        ax.set_title(MODE_LABELS[mode], fontsize=9)
        states = np.arange(v.shape[1])
        profile.plot(states, np.median(v, 0), color=MODE_COLOURS[mode], label=f"{mode}: median over iterations")
        profile.plot(states, v.max(0), "--", color=MODE_COLOURS[mode], label=f"{mode}: maximum")
    fig.colorbar(image, ax=axes[len(runs) - 1], label="log10 ||dL/dx_t||^2 (summed over noises)")
    profile.set_xticks([0, n], ["x_T", "x_0"])
    profile.set_xlabel("sampler state")
    profile.set_ylabel("log10 ||dL/dx_t||^2")
    profile.set_title("per state", fontsize=9)
    profile.legend(fontsize=7)
    fig.suptitle("Fig. 36: gradient reaching each sampler state, MSD vs full gradient", fontsize=10)
    return _save(fig, path)
