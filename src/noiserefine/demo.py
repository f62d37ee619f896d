"""The main job on the embedded default: a labelled picture grid (Gaussian unguided | the refiner's
teacher | NoiseRefine unguided, same seeds) and the benchmark table."""

from __future__ import annotations

from pathlib import Path

from dataclasses import dataclass

import numpy as np
import torch

from noiserefine.api import load_refiner
from noiserefine.evaluation.bench import RESULTS as BENCH_RESULTS, check_bench_size, run_bench
from noiserefine.evaluation.timing import DEFAULT_ROUNDS, DEFAULT_THREADS, check_timing, torch_threads
from noiserefine.evaluation.judge import load_judge
from noiserefine.generation import GaussianNoise, NoiseMethod, SamplingOptions, generate_latents
from noiserefine.guidance import Teacher
from noiserefine.io import OutputFolder
from noiserefine.methods.refine import NoiseRefiner, RefinedNoise
from noiserefine.sampling import as_saved, to_uint8
from noiserefine.world import ALL_PROMPTS
from noiserefine.world.shapes16 import parse_prompt

GRID_PROMPTS = ALL_PROMPTS[::7]
"""Every 7th of the 48 prompts: 7 prompts covering every colour, shape and position. With seeds
0-2 they are fixed in advance, not picked by result."""
GRID_SEEDS = (0, 1, 2)
RESULTS = ("grid.png", *BENCH_RESULTS)
"""What `run_demo` writes (`OutputFolder` results)."""


@dataclass(frozen=True)
class Column:
    title: str
    method: NoiseMethod
    sampling: SamplingOptions


def grid_columns(refiner: NoiseRefiner) -> list[Column]:
    """Gaussian noise unguided, the same noise with the refiner's teacher guidance, refined noise
    unguided; each titled with its model evaluations per image."""
    teacher = Teacher.from_record(refiner.config.teacher)
    guided = SamplingOptions(teacher.at_scale(None), teacher.steps, teacher.scheduler)
    plain = SamplingOptions(steps=teacher.steps)
    return [Column(f"Gaussian noise, unguided\n{plain.nfe} model evaluations", GaussianNoise(), plain),
            Column(f"Gaussian noise, teacher {teacher.guidance.name}\n{guided.nfe} model evaluations",
                   GaussianNoise(), guided),
            Column(f"NoiseRefine noise, unguided\n{plain.nfe + 1} model evaluations", RefinedNoise(refiner), plain)]


def picture_grid(out: Path) -> Path:
    """`out/grid.png`: rows are GRID_PROMPTS, each column group one way to sample, the three seeds
    side by side; a green frame marks an image the primary judge reads as the prompt, a red one an
    image it does not, and each group's title gives its adherence over the grid."""
    refiner = load_refiner()
    bb, judge = refiner.backbone, load_judge("primary")
    prompts = [p for p in GRID_PROMPTS for _ in GRID_SEEDS]
    seeds = [s for _ in GRID_PROMPTS for s in GRID_SEEDS]
    images, right = [], []
    for col in grid_columns(refiner):
        x = as_saved(bb.decode(generate_latents(bb, prompts, seeds, col.method, col.sampling)))
        images.append(to_uint8(x))
        predicted = judge.predict(x)
        right.append([all(predicted[a][i] == getattr(parse_prompt(p), a) for a in predicted)
                      for i, p in enumerate(prompts)])
    return _draw(out / "grid.png", grid_columns(refiner), images, right)


def _draw(path: Path, columns: list[Column], images: list[np.ndarray], right: list[list[bool]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(GRID_SEEDS)
    fig, axes = plt.subplots(len(GRID_PROMPTS), len(columns) * k, figsize=(1.0 * len(columns) * k + 2.2, 8.4),
                             gridspec_kw={"wspace": 0.08, "hspace": 0.12})
    for c, col in enumerate(columns):
        for r, prompt in enumerate(GRID_PROMPTS):
            for j, seed in enumerate(GRID_SEEDS):
                i, ax = r * k + j, axes[r, c * k + j]
                ax.imshow(images[c][i], interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                for side in ax.spines.values():
                    side.set_edgecolor("#1a9641" if right[c][i] else "#d7191c")
                    side.set_linewidth(2.5)
                if r == 0:
                    ax.set_title(f"seed {seed}", fontsize=7)
                if c == 0 and j == 0:
                    ax.set_ylabel(prompt.removeprefix("a "), rotation=0, ha="right", va="center", fontsize=8)
        share = sum(right[c]) / len(right[c])
        fig.text((c * k + k / 2) / (len(columns) * k) * 0.78 + 0.2, 0.905, f"{col.title}\nadherence {share:.2f}",
                 ha="center", va="bottom", fontsize=9, weight="bold")
    fig.subplots_adjust(left=0.2, right=0.98, top=0.86, bottom=0.07)
    fig.text(0.5, 0.015, "Prompts: every 7th of the 48, seeds 0-2 (fixed in advance, not picked by result). "
             "Frame: green = the primary judge reads the prompt, red = it does not.", ha="center", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_demo(out: Path, n: int = 200, overwrite: bool = False, threads: int = DEFAULT_THREADS,
             rounds: int = DEFAULT_ROUNDS) -> Path:
    """Grid + bench into `out` (a folder holding a demo is refused unless `overwrite`); returns the
    bench table path. Both run with `threads` torch threads; the bench times its rows in `rounds`
    interleaved rounds (`noiserefine.evaluation.timing`)."""
    folder = OutputFolder(Path(out), RESULTS, overwrite=overwrite).check()
    check_bench_size(n)
    check_timing(threads, rounds)
    torch.manual_seed(0)
    with torch_threads(threads):
        picture_grid(folder.open())
    return run_bench(out, n=n, threads=threads, rounds=rounds)
