"""The sampler loop: (backbone, scheduler, x_T, cond, guidance, grad_mode) -> x_0.

Samplers never draw their own noise: x_T (unit variance) is an argument, scaled here by the
scheduler's `init_noise_sigma`. Gradient mode is an argument, not a decorator:

- "none": no autograd graph at all (inference).
- "msd":  Multistep Score Distillation (NoiseRefine Eq. 5): every model output is computed without
          a graph (stop-gradient), while the scheduler's update algebra keeps the graph w.r.t. x_T.
          Memory is flat in the number of steps N.
- "full": gradients through the model at every step (NoiseRefine Eq. 3); memory grows with N.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Literal

import numpy as np
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from tqdm.auto import tqdm

from noiserefine.backbones.base import Backbone, Cond
from noiserefine.errors import NoiseRefineError
from noiserefine.guidance import UNGUIDED, Guidance, guided_prediction

GradMode = Literal["none", "msd", "full"]
SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {"clip_sample": False, "set_alpha_to_one": False}),
    "euler": (EulerDiscreteScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}


def make_scheduler(name: str, base_config: dict[str, Any], spacing: str | None = None) -> SchedulerMixin:
    """A diffusers scheduler of kind `name` on the backbone's noise schedule, built as diffusers
    builds one from a pipeline's config (`cls.from_config(pipe.scheduler.config)`): timestep
    spacing, steps offset and prediction type follow the model's own scheduler configuration
    (SD 2.1: "leading" with offset 1; shapes16: "trailing"), unless `spacing` names one. DDIM never
    clips x_0 and ends at the last grid step's alpha. Flow-matching models (SiT) take their own Euler."""
    if base_config.get("_class_name") == FlowMatchEulerDiscreteScheduler.__name__:
        if name != "euler":
            raise NoiseRefineError(f"a flow-matching model samples with 'euler', not {name!r}")
        return FlowMatchEulerDiscreteScheduler.from_config(dict(base_config))
    if name not in SCHEDULERS:
        raise NoiseRefineError(f"unknown scheduler {name!r}; choose from {sorted(SCHEDULERS)}")
    cls, overrides = SCHEDULERS[name]
    return cls.from_config(dict(base_config), **overrides, **({"timestep_spacing": spacing} if spacing else {}))


def sampler_record(name: str, base_config: dict[str, Any], steps: int) -> dict[str, Any]:
    """What a target manifest and a refiner card record of a sampler: the scheduler, the settings
    that place its steps, and the `steps` timesteps it visits (the trajectory a refiner is trained on)."""
    scheduler = make_scheduler(name, base_config)
    scheduler.set_timesteps(steps)
    config = scheduler.config
    return {"scheduler": name, "class": type(scheduler).__name__, "timestep_spacing": config.get("timestep_spacing"),
            "steps_offset": config.get("steps_offset", 0), "prediction_type": config.get("prediction_type"),
            "timesteps": [int(t) if float(t).is_integer() else round(float(t), 4) for t in scheduler.timesteps]}


def noise_for_seeds(seeds: list[int], shape: tuple[int, ...],
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One generator per seed (as EDM2 does), so a sample does not depend on its batch."""
    return torch.stack([
        torch.randn(shape, generator=torch.Generator().manual_seed(int(s)), dtype=dtype)
        for s in seeds
    ])


def check_noise(x_T: torch.Tensor, latent_shape: tuple[int, ...]) -> None:
    """Reject noise of the wrong shape, dtype or with non-finite values (never silently fix it)."""
    if not isinstance(x_T, torch.Tensor):
        raise NoiseRefineError(f"noise must be a torch.Tensor, got {type(x_T).__name__}")
    if tuple(x_T.shape[1:]) != tuple(latent_shape) or x_T.ndim != len(latent_shape) + 1:
        raise NoiseRefineError(
            f"noise has shape {tuple(x_T.shape)}, expected (batch, {', '.join(map(str, latent_shape))})")
    if not x_T.is_floating_point():
        raise NoiseRefineError(f"noise must be a floating-point tensor, got {x_T.dtype}")
    if not bool(torch.isfinite(x_T).all()):
        raise NoiseRefineError("noise contains NaN or infinite values")


def _grad_context(grad_mode: GradMode) -> contextlib.AbstractContextManager:
    if grad_mode not in ("none", "msd", "full"):
        raise NoiseRefineError(f"grad_mode must be 'none', 'msd' or 'full', got {grad_mode!r}")
    return torch.enable_grad() if grad_mode == "full" else torch.no_grad()


def denoise(
    backbone: Backbone,
    scheduler: SchedulerMixin,
    x_T: torch.Tensor,
    cond: Cond,
    *,
    steps: int = 20,
    uncond: Cond | None = None,
    guidance: Guidance = UNGUIDED,
    grad_mode: GradMode = "none",
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Run the sampler from x_T to x_0 (latent space).

    Args:
        x_T: (B, *latent_shape) unit-variance initial noise.
        cond / uncond: conditioning of the prompts and of the empty prompt (needed for CFG).
        steps: number of sampler steps.
        guidance: none / CFG / PAG / CFG+PAG; every branch in one batched forward per step; steps
            outside its interval (`start`/`stop`) run the conditional branch alone.
        grad_mode: "none", "msd" (stop-gradient on model outputs, Eq. 5) or "full" (Eq. 3).
        callback: called as callback(i, t, x) after each step.
    Returns:
        x_0, (B, *latent_shape).
    """
    check_noise(x_T, backbone.latent_shape)
    if steps < 1:
        raise NoiseRefineError(f"steps must be >= 1, got {steps}")
    scheduler.set_timesteps(steps, device=x_T.device)
    x = x_T * getattr(scheduler, "init_noise_sigma", 1.0)  # flow matching starts at unit noise
    outer = torch.no_grad() if grad_mode == "none" else contextlib.nullcontext()
    with outer:
        n = len(scheduler.timesteps)
        for i, t in enumerate(tqdm(scheduler.timesteps, disable=not progress, desc="sampling", leave=False)):
            x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
            with _grad_context(grad_mode):  # the model runs in its dtype, the update in x's
                out = guided_prediction(backbone, x_in.to(backbone.dtype), t, cond, uncond, guidance.at_step(i, n))
            x = scheduler.step(out.to(x.dtype), t, x, return_dict=False)[0]
            if callback is not None:
                callback(i, t, x)
    return x


MAX_SEEDS = 1_000_000
"""Most seeds one command takes (4x the largest paper recipe); a bigger set is made in parts."""


def seeds_from_range(spec: str) -> list[int]:
    """Parse `A-B` (inclusive) or `A,B,C` into a list of at most `MAX_SEEDS` seeds."""
    ranged = "-" in spec.strip("-")
    try:
        values = [int(v) for v in (spec.split("-", 1) if ranged else spec.split(","))]
    except ValueError:
        raise NoiseRefineError(f"seeds must look like '0-99' or '1,5,9', got {spec!r}") from None
    if ranged and values[1] - values[0] + 1 > MAX_SEEDS:
        raise NoiseRefineError(f"seed range {spec!r} holds {values[1] - values[0] + 1:,} seeds; at most "
                               f"{MAX_SEEDS:,} per run (make a larger set in parts)")
    seeds = list(range(values[0], values[1] + 1)) if ranged else values
    if not seeds or min(seeds) < 0:
        raise NoiseRefineError(f"seed range {spec!r} is empty or negative")
    return seeds


def as_saved(images: torch.Tensor) -> torch.Tensor:
    """Images exactly as a PNG holds them (clamped to [-1, 1], quantised to 8 bits), so scores
    computed in memory equal scores of the saved files."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, as a PNG stores it (see `as_saved`)."""
    arr = ((as_saved(images) + 1) * 127.5).round().to(torch.uint8)
    return arr.permute(0, 2, 3, 1).cpu().numpy()
