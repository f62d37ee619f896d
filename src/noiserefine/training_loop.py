"""One resumable training loop for every trainer (refiner, base model, judge, NPNet).

A trainer builds its modules and a fresh optimizer, writes a step function, and calls
`run_training_loop`. The loop owns what the trainers used to write each for itself:

- resume: the configuration is checked against the checkpoint (`checkpoint.check_resume_config`),
  then modules and optimizer are restored from it and the run continues at its step;
- the learning rate: a `diffusers.optimization.get_scheduler` schedule (constant, cosine, linear,
  ... with optional warmup), positioned at the resumed step, so a resumed run sees the same
  learning rate at every step as an uninterrupted one;
- the step loop with a tqdm progress bar (running mean of the loss);
- atomic checkpoints every `checkpoint_every` steps and at the last step (`checkpoint.py`);
- a per-step report hook (`on_step(step, loss, lr)`: experiment trackers, validation images);
- Ctrl-C: the bar is closed, the last checkpoint is kept (a save cut by the interrupt leaves the
  previous one), a line says where the run resumes, and KeyboardInterrupt propagates.

Usage (a trainer whose batches are drawn from generators seeded by (seed, step), so that a
resumed run repeats the uninterrupted one exactly)::

    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr)      # fresh: lr is the base rate

    def step_fn(step: int) -> float:                          # one optimizer step, 0-based
        x, y = batch(cfg.seed, step)
        loss = F.mse_loss(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()                                            # at the rate the loop has set
        return float(loss)

    settings = LoopSettings(out / "checkpoint", steps=cfg.steps, lr_schedule="cosine",
                            checkpoint_every=cfg.checkpoint_every, config=comparable_config)
    result = run_training_loop(settings, {"net": net}, opt, step_fn)
    # result.losses: every step's loss from step 0; result.seconds: this run's time

The step function must not change the learning rate, and should only draw randomness from
generators seeded by the step (the global torch RNG is not checkpointed). Under accelerate,
pass `is_main_process` (only it writes checkpoints) and `wait_for_everyone`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from diffusers.optimization import SchedulerType, get_scheduler
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from noiserefine.checkpoint import check_resume_config, load_checkpoint, save_checkpoint
from noiserefine.errors import NoiseRefineError

log = logging.getLogger(__name__)

# diffusers schedules that need nothing beyond warmup and the step budget (piecewise_constant
# needs its own step rules).
LR_SCHEDULES = tuple(s.value for s in SchedulerType if s is not SchedulerType.PIECEWISE_CONSTANT)
_STEP_FREE = ("constant", "constant_with_warmup")  # schedules that do not depend on the step budget


@dataclass(frozen=True)
class LoopSettings:
    """How `run_training_loop` runs.

    Attributes:
        checkpoint: checkpoint folder (e.g. `out / "checkpoint"`); resumed from when it holds one.
        steps: optimizer steps of the whole run, counted from 0 (not from the resumed step).
        lr_schedule: a diffusers `get_scheduler` name (`LR_SCHEDULES`); it multiplies the
            optimizer's base learning rate, e.g. cosine: lr * (1 + cos(pi * step / steps)) / 2.
        warmup_steps: linear warmup steps of the schedules that have one (0: none).
        checkpoint_every: save every K steps (and at the last step).
        config: the recipe a resumed run must share (compared with the checkpoint's, saved in it).
        may_change: keys of `config` a resumed run may change (e.g. "steps").
        desc: progress-bar label. progress: show the bar.
        postfix: name of the running-mean loss on the bar; window: steps it averages.
        is_main_process: whether this process writes checkpoints and shows the bar.
        wait_for_everyone: barrier after each checkpoint (accelerate's), None in one process.
        on_step: called after every step with (steps done, the step's loss, the learning rate it
            ran at), in every process; None: nothing to report.
    """

    checkpoint: Path
    steps: int
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    checkpoint_every: int = 100
    config: dict[str, Any] = field(default_factory=dict)
    may_change: tuple[str, ...] = ()
    desc: str = "train"
    progress: bool = True
    postfix: str = "loss"
    window: int = 20
    is_main_process: bool = True
    wait_for_everyone: Callable[[], None] | None = None
    on_step: Callable[[int, float, float], None] | None = None

    def __post_init__(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise NoiseRefineError(f"unknown lr schedule {self.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
        if min(self.steps, self.checkpoint_every) < 1 or self.warmup_steps < 0:
            raise NoiseRefineError(f"need steps >= 1, checkpoint_every >= 1 and warmup_steps >= 0, got "
                                   f"{self.steps}, {self.checkpoint_every}, {self.warmup_steps}")

    def schedule_record(self) -> dict[str, Any]:
        """What fixes the learning rate of every step (saved with each checkpoint, checked on resume)."""
        record: dict[str, Any] = {"name": self.lr_schedule, "warmup_steps": self.warmup_steps}
        if self.lr_schedule not in _STEP_FREE:
            record["steps"] = self.steps
        return record


@dataclass
class LoopResult:
    """losses: every step's loss from step 0 (the resumed part restored from the checkpoint);
    start: the step this run began at (0, or the checkpoint's); seconds: this run's wall time."""

    losses: list[float]
    start: int
    seconds: float


def run_training_loop(settings: LoopSettings, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer,
                      step_fn: Callable[[int], float]) -> LoopResult:
    """Run (or resume) steps `start .. settings.steps - 1` of a training run.

    Args:
        settings: see `LoopSettings`.
        modules: what a checkpoint saves and restores besides the optimizer, by name (the names
            prefix the tensor names; anything with state_dict/load_state_dict).
        opt: a fresh optimizer; its param groups' `lr` are the base learning rates.
        step_fn: one optimizer step of 0-based index `step` at the learning rate set in `opt`
            (forward, backward, `opt.step()`); returns the step's loss.
    Returns:
        The run's losses, start step and time.
    """
    base_lrs = [group["lr"] for group in opt.param_groups]  # before a checkpoint overwrites them
    check_resume_config(settings.checkpoint, settings.config, settings.may_change)
    record = load_checkpoint(settings.checkpoint, modules, opt)
    start, losses = (record["step"], list(record.get("losses", []))) if record else (0, [])
    _check_resumable(settings, record)
    if start:
        log.info("resuming %s at step %d of %d", settings.checkpoint, start, settings.steps)
    scheduler = _lr_scheduler(opt, settings, start, base_lrs)
    saved = start
    bar = tqdm(range(start, settings.steps), initial=start, total=settings.steps, desc=settings.desc, unit="step",
               disable=not (settings.progress and settings.is_main_process))
    t0 = time.time()
    try:
        for step in bar:
            lr = opt.param_groups[0]["lr"]  # the rate this step runs at
            losses.append(float(step_fn(step)))
            scheduler.step()
            if settings.on_step is not None:
                settings.on_step(step + 1, losses[-1], lr)
            bar.set_postfix({settings.postfix: f"{np.mean(losses[-settings.window:]):.4g}"})
            if (step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps:
                _save(settings, step + 1, modules, opt, losses)
                saved = step + 1
    except KeyboardInterrupt:
        bar.close()
        if settings.is_main_process:
            kept = f"the checkpoint of step {saved} is kept" if saved else "no checkpoint was written yet"
            log.warning("interrupted at step %d of %d; %s in %s: run the same command to resume",
                        len(losses), settings.steps, kept, settings.checkpoint)
        raise
    bar.close()
    return LoopResult(losses, start, time.time() - t0)


def _lr_scheduler(opt: torch.optim.Optimizer, settings: LoopSettings, start: int,
                  base_lrs: list[float]) -> LambdaLR:
    """The diffusers schedule positioned at step `start`: the learning rate in `opt` is then the
    one of step `start` (base_lr * schedule(start)), and each `.step()` moves it one step on.

    A LambdaLR is stateful, so a resumed run must not build it at step 0: it is built with
    `last_epoch = start - 1` from the base rates (not from the restored param groups, which hold
    the last rate used)."""
    for group, lr in zip(opt.param_groups, base_lrs):
        group["lr"] = group["initial_lr"] = lr
    return get_scheduler(settings.lr_schedule, opt, num_warmup_steps=settings.warmup_steps,
                         num_training_steps=settings.steps, last_epoch=start - 1)


def _check_resumable(settings: LoopSettings, record: dict[str, Any] | None) -> None:
    """A resumed run must continue the same learning-rate sequence and not be past its end."""
    if record is None:
        return
    saved = record.get("lr_schedule")  # absent in checkpoints written before this loop
    if saved is not None and saved != settings.schedule_record():
        raise NoiseRefineError(
            f"{settings.checkpoint} was written with learning-rate schedule {saved}; resuming with "
            f"{settings.schedule_record()} would change the rate of the remaining steps: resume with the same "
            "settings or use a new folder")
    if record["step"] > settings.steps:
        raise NoiseRefineError(f"{settings.checkpoint} is at step {record['step']}, past the {settings.steps} steps "
                               "asked for: ask for at least as many steps or use a new folder")


def _save(settings: LoopSettings, step: int, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer,
          losses: list[float]) -> None:
    if settings.is_main_process:
        save_checkpoint(settings.checkpoint, step, modules, opt,
                        {"losses": losses, "config": settings.config, "lr_schedule": settings.schedule_record()})
    if settings.wait_for_everyone is not None:
        settings.wait_for_everyone()
