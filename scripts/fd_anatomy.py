"""Where a sample set's FD comes from: pixel colours or shape geometry.

For each guidance setting, on the bench's prompts and seeds (20 DDIM steps), prints the primary
judge's FD against the 2,000 reference renders, the FD after snapping every pixel to the nearest
of the world's five colours (background + 4 shape colours: what is left is geometry), the mean
painted area per shape against real renders of the same prompts, and, once, the FD of real renders
of the same prompts (the floor of FD at this n). The README's "Where guidance helps" quotes it.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/fd_anatomy.py --n 1000 1 3:0.6
    (a setting is CFG[:start[:stop]]; 1 is unguided; --model picks another base weights file)
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from noiserefine.backbones.loading import load_backbone
from noiserefine.evaluation.bench import bench_setup
from noiserefine.evaluation.judge import load_judges
from noiserefine.evaluation.metrics import frechet_distance, judge_features, reference_features
from noiserefine.guidance import Guidance
from noiserefine.sampling import as_saved, denoise, make_scheduler, noise_for_seeds
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


def guidance_of(setting: str) -> Guidance:
    parts = [float(v) for v in setting.split(":")]
    if parts[0] == 1.0:
        return Guidance()
    return Guidance(parts[0], start=parts[1] if len(parts) > 1 else 0.0, stop=parts[2] if len(parts) > 2 else 1.0)


@torch.no_grad()
def sample(backbone, setup, n: int, guidance: Guidance, batch: int = 250) -> torch.Tensor:
    images = []
    for i in range(0, n, batch):
        prompts = setup.prompts[i:i + batch]
        x_T = noise_for_seeds(setup.seeds[i:i + batch], backbone.latent_shape)
        x_0 = denoise(backbone, make_scheduler("ddim", backbone.scheduler_config), x_T,
                      backbone.encode_prompts(prompts), uncond=backbone.encode_prompts([""] * len(prompts)),
                      guidance=guidance, steps=20)
        images.append(as_saved(backbone.decode(x_0)))
    return torch.cat(images)


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
        print(f"{name:>14}: FD {fd:6.1f}  palette-snapped FD {snapped:6.1f}  mean area  {areas}", flush=True)

    real = torch.from_numpy(render([parse_prompt(p) for p in prompts], np.random.default_rng(1)))
    report("real renders", real)
    for setting in args.settings:
        guidance = guidance_of(setting)
        report(guidance.name, sample(backbone, setup, args.n, guidance))


if __name__ == "__main__":
    main()
