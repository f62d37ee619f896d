"""Where a sample set's FD comes from: pixel colours or shape geometry.

For each guidance setting, on the bench's prompts and seeds (20 DDIM steps), prints the primary
judge's FD against the 2,000 reference renders, the FD after snapping every pixel to the nearest
of the world's five colours (background + 4 shape colours: what is left is geometry), the mean
painted area per shape against real renders of the same prompts, and, once, the FD of real renders
of the same prompts (the floor of FD at this n). The README's "Where guidance helps" quotes it.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/fd_anatomy.py --n 1000 gaussian gaussian@cfg3+start0.6 gaussian@cfg2
    (a setting is a bench row of a noise method; --model picks another base weights file)
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from noiserefine.api import method_context
from noiserefine.backbones.loading import load_backbone
from noiserefine.evaluation.bench import bench_setup, parse_row
from noiserefine.evaluation.judge import load_judges
from noiserefine.methods import registry
from noiserefine.evaluation.metrics import frechet_distance, judge_features, reference_features
from noiserefine.generation import SamplingOptions, generate_latents
from noiserefine.sampling import as_saved
from noiserefine.world.shapes16 import BACKGROUND, COLORS, SHAPES, parse_prompt, render

PALETTE = torch.tensor([(BACKGROUND,) * 3, *COLORS.values()]) * 2 - 1  # (5, 3) in [-1, 1]


def snap_to_palette(images: torch.Tensor) -> torch.Tensor:
    """Every pixel replaced by the nearest world colour (Euclidean in RGB)."""
    pixels = images.permute(0, 2, 3, 1)
    nearest = ((pixels[..., None, :] - PALETTE) ** 2).sum(-1).argmin(-1)
    return PALETTE[nearest].permute(0, 3, 1, 2)


def painted_area(images: torch.Tensor) -> torch.Tensor:
    """Pixels per image whose colour differs from the background by more than 0.35 in some channel."""
    return ((images - PALETTE[0][:, None, None]).abs().amax(1) > 0.35).sum((1, 2)).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("settings", nargs="+")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    backbone, judge = load_backbone(args.model), load_judges()["primary"]
    setup, ref = bench_setup(args.n, 250), reference_features(judge)
    prompts = setup.prompts[:args.n]
    shape_of = np.array([parse_prompt(p).shape for p in prompts])

    def report(name: str, images: torch.Tensor) -> None:
        fd = frechet_distance(judge_features(judge, images), ref)
        snapped = frechet_distance(judge_features(judge, snap_to_palette(images)), ref)
        area = painted_area(images)
        areas = "  ".join(f"{s} {area[torch.from_numpy(shape_of == s)].mean():.1f}" for s in SHAPES)
        print(f"{name:>24}: FD {fd:6.1f}  palette-snapped FD {snapped:6.1f}  mean area  {areas}", flush=True)

    real = torch.from_numpy(render([parse_prompt(p) for p in prompts], np.random.default_rng(1)))
    report("real renders", real)
    for row in map(parse_row, args.settings):
        options = SamplingOptions(row.guidance, row.steps, "ddim", 250)
        latents = generate_latents(backbone, prompts, setup.seeds[:args.n],
                                   registry.build(row.method, method_context(backbone, options), **dict(row.options)),
                                   options)
        report(row.label, as_saved(backbone.decode(latents)))


if __name__ == "__main__":
    main()
