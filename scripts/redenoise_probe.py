"""Does re-denoised noise (Golden Noise's training targets) sample better than its source noise?

Adherence (primary, held-out judge) of unguided 20-step samples from Gaussian noise, from
re-denoised noise at several (DDIM grid, high CFG, low CFG) settings, and from noise plus the
first guided step's x_0 (DDIM inversion queried at t = T), on 480 seeds no bench or training run
uses. Then the structure of the change delta = x_T' - x_T (the default setting, and the shipped
NPNet's): the share of its energy that is one constant per prompt, and what each part does when
added to x_T alone. The README's "why NPNet does not help" paragraph quotes this script's output.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/redenoise_probe.py [--model BASE.safetensors]

(`--model`: another shapes16 base, e.g. one trained with `train-base --noise-schedule sd`; the
shipped NPNet belongs to the shipped base, so its line is skipped then.)
"""

from __future__ import annotations

import argparse

import torch

from noiserefine.methods.registry import MethodContext, build
from noiserefine.backbones.loading import load_backbone
from noiserefine.evaluation.judge import load_judges
from noiserefine.evaluation.metrics import score_images
from noiserefine.guidance import Guidance, guided_prediction
from noiserefine.npnet_pairs import redenoise
from noiserefine.sampling import denoise, make_scheduler, noise_for_seeds
from noiserefine.world import ALL_PROMPTS

SETTINGS = [(20, 3.0, 1.0), (10, 5.0, 1.0), (5, 3.0, 1.0), (5, 5.0, 1.0), (5, 5.0, 0.0), (3, 5.0, 1.0)]


@torch.no_grad()
def main(model: str | None = None, n: int = 480, first_seed: int = 3_000_000) -> None:
    backbone, judges = load_backbone(model), load_judges()
    seeds = list(range(first_seed, first_seed + n))
    prompts = [ALL_PROMPTS[s % len(ALL_PROMPTS)] for s in seeds]
    x_T = noise_for_seeds(seeds, backbone.latent_shape)
    cond, uncond = backbone.encode_prompts(prompts), backbone.encode_prompts([""] * n)

    def adherence(noise: torch.Tensor) -> str:
        x_0 = denoise(backbone, make_scheduler("ddim", backbone.scheduler_config), noise, cond, steps=20)
        scores = score_images(backbone.decode(x_0), prompts, judges)
        return f"adherence {scores['adherence']:.3f}  held-out {scores['heldout_adherence']:.3f}"

    print("gaussian", adherence(x_T), flush=True)
    targets = {}
    for grid, high, low in SETTINGS:
        targets[grid, high, low] = redenoise(backbone, x_T, cond, uncond, high_cfg=high, low_cfg=low, grid_steps=grid)
        print(f"re-denoise grid {grid} high {high:g} low {low:g}:", adherence(targets[grid, high, low]), flush=True)
    sched = make_scheduler("ddim", backbone.scheduler_config)
    sched.set_timesteps(20)
    t_T = sched.timesteps[0]
    for high in (3.0, 5.0):  # x_1 = sqrt(a_1) x0_hi + sqrt(1 - a_1) x_T, rescaled to unit variance
        x_1 = sched.step(guided_prediction(backbone, x_T, t_T, cond, uncond, Guidance(high)), t_T, x_T,
                         return_dict=False)[0]
        print(f"noise + first guided x_0, CFG {high:g}:", adherence(x_1 / x_1.flatten(1).std(1).view(-1, 1, 1, 1)), flush=True)
    prompt_ids = torch.tensor([ALL_PROMPTS.index(p) for p in prompts])
    delta = targets[SETTINGS[0]] - x_T  # the setting the shipped NPNet's pairs were collected with
    deltas = {"re-denoise delta": delta}
    if model is None:
        deltas["NPNet delta"] = build("golden", MethodContext(backbone))(x_T, prompts) - x_T
    for name, d in deltas.items():
        print(f"{name}: rms {d.pow(2).mean().sqrt():.4f}, per-prompt constant "
              f"{per_prompt_mean(d, prompt_ids).pow(2).sum() / d.pow(2).sum():.0%} of its energy", flush=True)
    constant = per_prompt_mean(delta, prompt_ids)
    print("x_T + per-prompt constant of delta:", adherence(x_T + constant), flush=True)
    print("x_T + the rest of delta:", adherence(x_T + delta - constant), flush=True)
    print("x_T + 3 x the rest of delta:", adherence(x_T + 3 * (delta - constant)), flush=True)


def per_prompt_mean(delta: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
    """Each sample's delta replaced by the mean delta of the samples with its prompt."""
    means = torch.zeros((int(prompt_ids.max()) + 1, *delta.shape[1:]), dtype=delta.dtype)
    means.index_add_(0, prompt_ids, delta)
    return (means / torch.bincount(prompt_ids).view(-1, *[1] * (delta.ndim - 1)).clamp(min=1))[prompt_ids]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="shapes16 base weights (default: the shipped base)")
    main(parser.parse_args().model)
