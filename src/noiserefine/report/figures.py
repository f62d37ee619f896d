"""The report's figures (matplotlib, PNG): labelled line plots and picture grids with row and
column labels. Every function writes one file and returns its name (for `ItemResult.figures`)."""

from __future__ import annotations

import textwrap

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from noiserefine.sampling import to_uint8


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@dataclass
class Curve:
    """One line of a panel: y against x, with optional error bars (one standard error)."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    err: Sequence[float] | None = None
    style: str = "o-"


@dataclass
class Panel:
    """One set of axes: title, axis labels, its curves; `log_y` for a logarithmic y axis;
    `xticks` names the x positions (categorical axes)."""

    title: str
    xlabel: str
    ylabel: str
    curves: list[Curve]
    log_y: bool = False
    xticks: list[tuple[float, str]] = field(default_factory=list)


def line_panels(path: Path, panels: Sequence[Panel], suptitle: str) -> str:
    """Panels side by side, each with its legend; written to `path` (a PNG)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for c in panel.curves:
            if c.err is not None:
                ax.errorbar(c.x, c.y, yerr=c.err, fmt=c.style, capsize=3, label=c.label)
            else:
                ax.plot(c.x, c.y, c.style, label=c.label)
        if panel.log_y:
            ax.set_yscale("log")
        if panel.xticks:  # many labels slant, a few stand upright
            slant = len(panel.xticks) > 5
            ax.set_xticks([p for p, _ in panel.xticks], [t for _, t in panel.xticks], rotation=35 if slant else 0,
                          ha="right" if slant else "center", fontsize=8)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(_wrapped(suptitle, 4.6 * len(panels)), fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path).name


def judge_panels(path: Path, rows: Sequence[tuple[str, dict[str, Any]]], title: str,
                 fd_reference: str = "real renders", heldout_shift: float = 0.0) -> str:
    """The common two-panel figure of scored rows (`measure.score` records), one x position per
    (label, record): adherence under both judges with one SE, and both judges' FD to
    `fd_reference`. `heldout_shift` moves the held-out adherence points right so the bars do not overlap."""
    x = list(range(len(rows)))
    ticks = [(i, label) for i, (label, _) in enumerate(rows)]
    recs = [rec for _, rec in rows]
    return line_panels(path, [
        Panel("prompt adherence (± 1 SE)", "", "adherence", [
            Curve("primary judge", x, [r["adherence"] for r in recs], [r["adherence_se"] for r in recs], "o"),
            Curve("held-out judge", [i + heldout_shift for i in x], [r["heldout_adherence"] for r in recs],
                  [r["heldout_adherence_se"] for r in recs], "s")], xticks=ticks),
        Panel(f"Frechet distance to {fd_reference}", "", "FD (lower is better)", [
            Curve("primary judge", x, [r["fd"] for r in recs], style="o"),
            Curve("held-out judge", x, [r["heldout_fd"] for r in recs], style="s")], xticks=ticks),
    ], title)


def _wrapped(title: str, width_in: float) -> str:
    """`title` broken into lines that fit a figure `width_in` inches wide at 11 pt (about 14 characters
    per inch), so a one-panel figure's title is not clipped at its edges."""
    return "\n".join(textwrap.wrap(title, width=max(20, int(14 * width_in))))


def histogram(path: Path, samples: dict[str, np.ndarray], title: str, xlabel: str) -> str:
    """Overlaid density histograms of the named samples."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for label, values in samples.items():
        ax.hist(values, bins=60, alpha=0.55, density=True, label=label)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path).name


def picture_grid(path: Path, images: Sequence[Sequence[torch.Tensor]], row_labels: Sequence[str],
                 col_labels: Sequence[str], title: str, caption: str = "") -> str:
    """A grid of (3, H, W) images in [-1, 1]: images[r][c] in row r, column c, each row and column
    labelled, a title above and a caption below."""
    plt = _pyplot()
    rows, cols = len(images), len(images[0])
    fig, axes = plt.subplots(rows, cols, figsize=(0.95 * cols + 2.6, 0.95 * rows + 1.2), squeeze=False,
                             gridspec_kw={"wspace": 0.06, "hspace": 0.1})
    for r in range(rows):
        for c in range(cols):
            ax = axes[r, c]
            ax.imshow(to_uint8(images[r][c][None])[0], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(col_labels[c], fontsize=7)
            if c == 0:
                ax.set_ylabel(row_labels[r], rotation=0, ha="right", va="center", fontsize=7)
    fig.subplots_adjust(left=2.4 / (0.95 * cols + 2.6), right=0.99, top=1 - 0.75 / (0.95 * rows + 1.2),
                        bottom=0.45 / (0.95 * rows + 1.2))
    fig.suptitle(title, fontsize=10)
    if caption:
        fig.text(0.5, 0.01, caption, ha="center", va="bottom", fontsize=7, wrap=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path).name
