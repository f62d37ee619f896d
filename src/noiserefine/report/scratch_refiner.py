"""The noise-refining network trained from scratch (NoiseRefine appendix C.1, Tab. 14): instead of a
LoRA on the pretrained denoiser, a network of the denoiser's own architecture, randomly initialised
(`Shapes16Backbone.create`, as the base was before its training), every parameter trained.

It keeps what the LoRA refiner has besides pretraining: one evaluation at t = T on (x_T, c), the
base's (frozen) prompt encoding as c, the residual x_hat_T = x_T + net(x_T, T, c) with a
zero-initialised output layer (so g_phi starts as the identity), and the training objective, data,
batches, optimizer and step budget of `train.train_refiner` (`RefinerObjective` on the same targets).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from noiserefine.backbones.base import Backbone, Cond, batch_timesteps
from noiserefine.backbones.shapes16 import Shapes16Backbone
from noiserefine.errors import NoiseRefineError
from noiserefine.io import load_tensors, save_tensors
from noiserefine.methods.refine import RefinerConfig
from noiserefine.targets import TargetSet, load_targets
from noiserefine.train import RefinerObjective, TrainConfig
from noiserefine.training_loop import LoopSettings, run_training_loop

WEIGHTS = "scratch.safetensors"


class ScratchRefiner(nn.Module):
    """g_phi(x_T, c) = x_T + net(x_T, T, c), `net` a freshly initialised shapes16 UNet."""

    def __init__(self, backbone: Backbone, seed: int = 0) -> None:
        super().__init__()
        if not isinstance(backbone, Shapes16Backbone):
            raise NoiseRefineError("a refiner from scratch is built for the embedded shapes16 model")
        self.backbone = backbone  # what RefinerObjective samples with (not a submodule: never trained)
        self.scale_proj = None  # no guidance-scale conditioning (RefinerObjective asks)
        self.net = Shapes16Backbone.create(seed).denoiser
        nn.init.zeros_(self.net.conv_out.weight)
        nn.init.zeros_(self.net.conv_out.bias)
        self.timestep = RefinerConfig.timestep

    def forward(self, x_T: torch.Tensor, cond: Cond, guidance_scale: float | None = None) -> torch.Tensor:
        t = batch_timesteps(torch.tensor(self.timestep), x_T)
        return x_T + self.net(x_T, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample


class ScratchNoise:
    """A trained scratch refiner as a noise method (one extra network evaluation per image)."""

    name = "scratch"
    extra_nfe = 1.0

    def __init__(self, refiner: ScratchRefiner) -> None:
        self.refiner = refiner.eval()

    @classmethod
    def load(cls, backbone: Backbone, run: Path) -> "ScratchNoise":
        refiner = ScratchRefiner(backbone)
        refiner.net.load_state_dict(load_tensors(Path(run) / WEIGHTS))
        return cls(refiner)

    @torch.no_grad()
    def __call__(self, x_T: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.refiner(x_T, self.refiner.backbone.encode_prompts(prompts))


def batch_indices(cfg: TrainConfig, step: int, n: int) -> np.ndarray:
    """The targets of step `step`: the same draw as `train_refiner`'s (same seed, same batches)."""
    return np.random.default_rng([cfg.seed, step]).choice(n, size=cfg.batch_size, replace=n < cfg.batch_size)


def is_trained(run: Path) -> bool:
    return (Path(run) / WEIGHTS).is_file()


def train_scratch(backbone: Backbone, targets: Path, out: Path, cfg: TrainConfig) -> Path:
    """Train (or resume, from `out/checkpoint`) a scratch refiner on `targets` with `cfg`'s loss,
    batches, learning rate, clipping and steps; writes `out/scratch.safetensors` and returns `out`."""
    out = Path(out)
    data = load_targets(targets, cfg.keep_fraction)
    backbone.denoiser.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    refiner = ScratchRefiner(backbone, cfg.seed)
    objective = RefinerObjective(refiner, cfg)  # type: ignore[arg-type]  # the refiner's interface
    params = list(refiner.net.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    loop = LoopSettings(out / "checkpoint", cfg.steps, lr_schedule=cfg.lr_schedule, checkpoint_every=cfg.checkpoint_every,
                        config={"architecture": "scratch", **asdict(cfg)}, may_change=("steps",),
                        desc=f"train (scratch, {cfg.loss})")
    run_training_loop(loop, {"net": refiner.net}, opt, lambda step: _step(objective, opt, params, data, cfg, step))
    save_tensors(out / WEIGHTS, refiner.net.state_dict())
    return out


def _step(objective: RefinerObjective, opt: torch.optim.Optimizer, params: list[nn.Parameter], data: TargetSet,
          cfg: TrainConfig, step: int) -> float:
    idx = batch_indices(cfg, step, len(data))
    loss = objective(data.x_T[idx], data.x_0[idx], [data.prompts[i] for i in idx], data.cfg[idx])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()
    return float(loss.detach())
