"""The main job on the embedded default: a picture grid (Gaussian unguided | CFG teacher |
NoiseRefine unguided, same seeds) and the benchmark table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from noiserefine.api import load_refiner
from noiserefine.evaluation.bench import RESULTS as BENCH_RESULTS, check_bench_size, run_bench
from noiserefine.evaluation.timing import DEFAULT_ROUNDS, DEFAULT_THREADS, check_timing, torch_threads
from noiserefine.generation import SamplingOptions, generate_latents
from noiserefine.guidance import Teacher
from noiserefine.io import OutputFolder, ensure_out_dir
from noiserefine.methods.refine import RefinedNoise
from noiserefine.sampling import to_uint8
from noiserefine.world import ALL_PROMPTS

GRID_PROMPTS = ALL_PROMPTS[::6]  # 8 prompts covering every color, shape and position
RESULTS = ("grid.png", "grid.txt", *BENCH_RESULTS)
"""What `run_demo` writes (`OutputFolder` results)."""


def picture_grid(out: Path, seeds: tuple[int, ...] = (0, 1, 2), scale: int = 4) -> Path:
    """Rows: prompts x seeds; columns: Gaussian unguided, Gaussian + teacher CFG, refined unguided."""
    refiner = load_refiner()
    bb = refiner.backbone
    teacher = Teacher.from_record(refiner.config.teacher)
    prompts = [p for p in GRID_PROMPTS for _ in seeds]
    seed_list = [s for _ in GRID_PROMPTS for s in seeds]
    columns = [
        generate_latents(bb, prompts, seed_list, None, SamplingOptions()),
        generate_latents(bb, prompts, seed_list, None, SamplingOptions(teacher.at_scale(None), teacher.steps, teacher.scheduler)),
        generate_latents(bb, prompts, seed_list, RefinedNoise(refiner), SamplingOptions()),
    ]
    tiles = [to_uint8(bb.decode(c)) for c in columns]  # each (N, H, W, 3)
    rows = [np.concatenate([t[i] for t in tiles], axis=1) for i in range(len(prompts))]
    grid = np.concatenate(rows, axis=0).repeat(scale, axis=0).repeat(scale, axis=1)
    path = ensure_out_dir(out) / "grid.png"
    Image.fromarray(grid).save(path)
    (out / "grid.txt").write_text(
        "columns: gaussian unguided | gaussian + teacher guidance | NoiseRefine unguided\n"
        + "".join(f"row {i}: {p} (seed {s})\n" for i, (p, s) in enumerate(zip(prompts, seed_list))))
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
