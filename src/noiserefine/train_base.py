"""Training the embedded shapes16 base model (v-prediction, prompt dropout for CFG).

Every step's data and noise come from generators seeded by (seed, step), so a killed run that
resumes from its last checkpoint reproduces the uninterrupted run exactly. A fine-tune is the same
loop started from trained weights (`init_from`) on a world variant (`world`, e.g. "shifted": the
transfer experiment of the NoiseRefine paper's Tab. 4).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler

from noiserefine.backbones.shapes16 import DEFAULT_WEIGHTS, NOISE_SCHEDULES, Shapes16Backbone
from noiserefine.errors import NoiseRefineError
from noiserefine.training_loop import LoopSettings, run_training_loop
from noiserefine.io import shipped_path
from noiserefine.world.shapes16 import random_prompts, render, world_palette


@dataclass
class BaseTrainConfig:
    steps: int = 2500
    batch_size: int = 32
    lr: float = 3e-4
    prompt_dropout: float = 0.15
    ema_decay: float = 0.999
    seed: int = 0
    checkpoint_every: int = 250
    snapshot_every: int = 0  # also keep EMA weights every K steps (to pick the world's base model)
    noise_schedule: str = "cosine"  # a key of NOISE_SCHEDULES
    world: str = "original"  # the world variant the batches are rendered in (world.shapes16.WORLD_VARIANTS)
    init_from: str | None = None  # start from these base weights ("shipped": the package's base) instead of a fresh init

    def __post_init__(self) -> None:
        if min(self.steps, self.batch_size, self.checkpoint_every) < 1 or self.snapshot_every < 0:
            raise NoiseRefineError(f"steps, batch size and checkpoint interval must be >= 1, got {self}")
        if not (0.0 <= self.prompt_dropout < 1.0 and 0.0 <= self.ema_decay < 1.0 and self.lr > 0):
            raise NoiseRefineError(
                f"need 0 <= prompt_dropout < 1, 0 <= ema_decay < 1 and lr > 0, got {self.prompt_dropout}, "
                f"{self.ema_decay}, {self.lr}")
        if self.noise_schedule not in NOISE_SCHEDULES:
            raise NoiseRefineError(f"unknown noise schedule {self.noise_schedule!r}; one of {sorted(NOISE_SCHEDULES)}")
        world_palette(self.world)  # an unknown variant is refused before anything runs
        if self.init_from is not None and self.init_from != "shipped" and not Path(self.init_from).is_file():
            raise NoiseRefineError(f"--init-from {self.init_from!r}: no such base weights file (or 'shipped')")


# Fields a resumed run may change: how long it runs and how often it saves.
_MAY_CHANGE_ON_RESUME = ("steps", "checkpoint_every", "snapshot_every")
# Step k of a run with seed s draws its noise and timesteps from generator seed s * stride + k: a
# prime above any run's step count, so no two (seed, step) pairs share a generator. Changing it
# changes every base model trained from here (the shipped one was trained with it).
NOISE_SEED_STRIDE = 1_000_003


def _batch(cfg: BaseTrainConfig, step: int) -> tuple[torch.Tensor, list[str]]:
    rng = np.random.default_rng([cfg.seed, step])
    prompts = random_prompts(cfg.batch_size, rng)
    images = torch.from_numpy(render(prompts, rng, cfg.world))
    drop = rng.uniform(size=cfg.batch_size) < cfg.prompt_dropout
    texts = ["" if d else p.text for p, d in zip(prompts, drop)]
    return images, texts


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def train_base(out: Path, cfg: BaseTrainConfig = BaseTrainConfig(), progress: bool = True) -> Path:
    """Train (or resume) the base model; writes `out/shapes16-base.safetensors` (EMA weights).
    Constant learning rate `cfg.lr`; atomic checkpoints under `out/checkpoint`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    schedule = NOISE_SCHEDULES[cfg.noise_schedule]
    model = _initial_model(cfg, schedule)
    unet, enc = model.denoiser, model.prompt_encoder
    ema = copy.deepcopy(torch.nn.ModuleDict({"unet": unet, "enc": enc})).requires_grad_(False)
    opt = torch.optim.AdamW(list(unet.parameters()) + list(enc.parameters()), lr=cfg.lr)
    noise_sched = DDPMScheduler.from_config(schedule)

    def step_fn(step: int) -> float:
        loss = _base_step(model, opt, noise_sched, cfg, step)
        _ema_update(ema, torch.nn.ModuleDict({"unet": unet, "enc": enc}), min(cfg.ema_decay, (1 + step) / (10 + step)))
        if cfg.snapshot_every and (step + 1) % cfg.snapshot_every == 0:
            (out / "snapshots").mkdir(exist_ok=True)
            Shapes16Backbone(copy.deepcopy(ema["unet"]), copy.deepcopy(ema["enc"]), scheduler_config=schedule).save(
                out / "snapshots" / f"shapes16-base-step{step + 1}.safetensors", {"training": asdict(cfg), "step": step + 1})
        return loss

    loop = LoopSettings(out / "checkpoint", cfg.steps, checkpoint_every=cfg.checkpoint_every, config=asdict(cfg),
                        may_change=_MAY_CHANGE_ON_RESUME, desc="train-base", progress=progress, window=50)
    run = run_training_loop(loop, {"unet": unet, "enc": enc, "ema": ema}, opt, step_fn)
    final = Shapes16Backbone(ema["unet"], ema["enc"], scheduler_config=schedule)
    path = out / "shapes16-base.safetensors"
    final.save(path, {"training": asdict(cfg), "final_loss_avg50": float(np.mean(run.losses[-50:])),
                      "train_seconds_this_run": round(run.seconds, 1)})
    return path


def _initial_model(cfg: BaseTrainConfig, schedule: dict) -> Shapes16Backbone:
    """A fresh model, or the weights `cfg.init_from` names (their noise schedule must be the run's)."""
    if cfg.init_from is None:
        return Shapes16Backbone.create(cfg.seed, schedule)
    path = shipped_path(DEFAULT_WEIGHTS) if cfg.init_from == "shipped" else Path(cfg.init_from)
    model = Shapes16Backbone.load(path)
    if model.scheduler_config != schedule:
        raise NoiseRefineError(f"{path} was trained with the noise schedule {model.scheduler_config}, this run "
                               f"uses {cfg.noise_schedule!r} ({schedule}); pass the matching --noise-schedule")
    model.denoiser.train()  # as a fresh model is (the UNet has no dropout: no effect on the numbers)
    model.prompt_encoder.train()
    return model


def _base_step(model: Shapes16Backbone, opt: torch.optim.Optimizer, noise_sched: DDPMScheduler,
               cfg: BaseTrainConfig, step: int) -> float:
    """One v-prediction step on the batch and noise of `step` (generators seeded by the step)."""
    images, texts = _batch(cfg, step)
    gen = torch.Generator().manual_seed(cfg.seed * NOISE_SEED_STRIDE + step)
    noise = torch.randn(images.shape, generator=gen)
    t = torch.randint(0, noise_sched.config.num_train_timesteps, (images.shape[0],), generator=gen)
    x_t = noise_sched.add_noise(images, noise, t)
    target = noise_sched.get_velocity(images, noise, t)
    pred = model.denoiser(x_t, t, encoder_hidden_states=model.prompt_encoder(model.prompt_encoder.tokenize(texts))).sample
    loss = torch.nn.functional.mse_loss(pred, target)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()
