"""Noise Diffusion's update and FD, on the bench's dev split: is the report's "the plain update gives
a lower FD" (test split, n = 100) a property of the update or of FD's sampling error at n = 100?

Prints, for the distribution-preserving update z' = sqrt(1-g) z + sqrt(g) s (the paper's) and the
plain one (1-g) z + g s, both judges' adherence and FD of the searched noises' images at n, and the
FD of each disjoint chunk of 100 images (the report's n); then the same figures for unsearched
Gaussian noise scaled by 1, 0.9, 0.835 and 0.7 (the plain update shrinks the noise to std ~0.83:
how much of an FD change does shrinking alone make?). docs/report.md quotes it.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/nd_update_fd.py --n 400     # about 3.5 minutes on 2 cores
"""

from __future__ import annotations

import argparse

import torch

from noiserefine.backbones.loading import load_backbone
from noiserefine.evaluation.bench import bench_setup
from noiserefine.evaluation.scorers import scorer_for
from noiserefine.generation import SamplingOptions, sample_from_noise
from noiserefine.methods.noise_diffusion import NoiseDiffusionConfig, optimize_noise
from noiserefine.report.measure import score
from noiserefine.sampling import as_saved, noise_for_seeds

CHUNK = 100
OPTIONS = SamplingOptions(steps=20)  # unguided 20-step DDIM, as the report


def images_of(backbone, noise: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    parts = [sample_from_noise(backbone, noise[i:i + CHUNK], prompts[i:i + CHUNK], OPTIONS)
             for i in range(0, len(prompts), CHUNK)]
    return as_saved(backbone.decode(torch.cat(parts)))


def line(label: str, images: torch.Tensor, prompts: list[str]) -> str:
    r = score(images, prompts)
    chunks = [score(images[i:i + CHUNK], prompts[i:i + CHUNK]) for i in range(0, len(prompts), CHUNK)]
    return (f"{label}: adherence {r['adherence']:.3f} (held-out {r['heldout_adherence']:.3f}), FD {r['fd']:.1f} / "
            f"{r['heldout_fd']:.1f}; FD per chunk of {CHUNK}: " + ", ".join(f"{c['fd']:.1f}/{c['heldout_fd']:.1f}"
                                                                         for c in chunks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=400, help="images (a multiple of 100)")
    n = parser.parse_args().n
    setup = bench_setup(n, CHUNK, split="dev")
    backbone = load_backbone()
    x_T = noise_for_seeds(setup.seeds, backbone.latent_shape)
    scorer = scorer_for(backbone, "judge", search=True)
    for update in ("preserving", "linear"):
        cfg = NoiseDiffusionConfig(rounds=10, candidates=16, update=update)  # the bench's and the report's
        found = optimize_noise(backbone, scorer, x_T, setup.prompts, cfg, OPTIONS).noise
        label = f"{update} update (noise std {found.flatten(1).std(1).mean():.3f})"
        print(line(label, images_of(backbone, found, setup.prompts), setup.prompts), flush=True)
    for scale in (1.0, 0.9, 0.835, 0.7):
        print(line(f"Gaussian x {scale}", images_of(backbone, scale * x_T, setup.prompts), setup.prompts), flush=True)


if __name__ == "__main__":
    main()
