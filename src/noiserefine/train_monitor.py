"""What a refiner training run reports as it goes, besides its checkpoints (as diffusers' training
scripts do): loss and learning rate per step to accelerate's experiment trackers (`--report-to
tensorboard`, written under RUN/logs), and every K steps a validation grid RUN/validation/step-K.png:
one row per validation prompt, Gaussian noise sampled unguided beside the same noise refined and
sampled unguided (one column per teacher scale of a scale-conditioned refiner), with the teacher's
steps and scheduler; prompt i takes noise seed i, fixed for the whole run.

    monitor = Monitoring(report_to="tensorboard", validation_prompts=("a cat",), validation_every=100)
    train_refiner(backbone, targets, out, cfg, monitoring=monitor)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import LoggerType

from noiserefine.errors import NoiseRefineError
from noiserefine.generation import GaussianNoise, NoiseMethod, SamplingOptions, generate_latents
from noiserefine.grids import write_grid
from noiserefine.guidance import Teacher
from noiserefine.methods.refine import NoiseRefiner, RefinedNoise
from noiserefine.sampling import to_uint8

log = logging.getLogger(__name__)

TRACKERS = tuple(t.value for t in LoggerType if t is not LoggerType.ALL)
"""accelerate's experiment trackers (--report-to); each needs its own package."""
PROJECT = "noiserefine"


@dataclass(frozen=True)
class Monitoring:
    """Trackers and validation images of a training run (none by default)."""

    report_to: str | None = None
    validation_prompts: tuple[str, ...] = ()
    validation_every: int = 0

    def __post_init__(self) -> None:
        if self.report_to is not None and self.report_to not in TRACKERS:
            raise NoiseRefineError(f"unknown tracker {self.report_to!r}; choose one of {', '.join(TRACKERS)}")
        if self.validation_every < 0 or bool(self.validation_prompts) != bool(self.validation_every):
            raise NoiseRefineError("validation images need both --validation-prompts and --validation-every K >= 1, "
                                   f"got {len(self.validation_prompts)} prompt(s) and every {self.validation_every}")

    def check(self) -> None:
        """Refuse a tracker whose package is missing (accelerate would silently log nothing)."""
        from accelerate.tracking import get_available_trackers

        if self.report_to is not None and self.report_to not in [str(t) for t in get_available_trackers()]:
            extra = " (pip install 'noiserefine[tensorboard]')" if self.report_to == "tensorboard" else ""
            raise NoiseRefineError(f"--report-to {self.report_to} needs the {self.report_to} package, which is not "
                                   f"installed{extra}")

    def accelerator_kwargs(self, out: Path) -> dict[str, Any]:
        """`Accelerator` arguments: the tracker, logging under out/logs."""
        if self.report_to is None:
            return {}
        from accelerate.utils import ProjectConfiguration

        return {"log_with": self.report_to,
                "project_config": ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs"))}


class StepReport:
    """The training loop's `on_step`: tracker values every step, a validation grid every K steps."""

    def __init__(self, monitoring: Monitoring, acc: Accelerator, refiner: NoiseRefiner, out: Path,
                 config: dict[str, Any]) -> None:
        self.monitoring, self.acc, self.refiner, self.out = monitoring, acc, refiner, Path(out)
        if monitoring.report_to is not None:
            acc.init_trackers(PROJECT, config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                               for k, v in config.items()})

    def __call__(self, step: int, loss: float, lr: float) -> None:
        if self.monitoring.report_to is not None:
            self.acc.log({"loss": loss, "lr": lr}, step=step)
        every = self.monitoring.validation_every
        if every and step % every == 0 and self.acc.is_main_process:
            path = validation_grid(self.refiner, self.monitoring.validation_prompts, self.out / "validation", step,
                                   self.acc)
            log.info("step %d: validation images %s", step, path)

    def close(self) -> None:
        if self.monitoring.report_to is not None:
            self.acc.end_training()


def validation_columns(refiner: NoiseRefiner) -> tuple[list[str], list[NoiseMethod], SamplingOptions]:
    """Column titles, noise methods and the (unguided) sampling of a validation grid."""
    teacher = Teacher.from_record(refiner.config.teacher or {})
    sampling = SamplingOptions(steps=teacher.steps, scheduler=teacher.scheduler, batch_size=8)
    scales = teacher.scales if refiner.scale_proj is not None else (None,)
    titles = ["Gaussian noise, unguided"] + [
        "NoiseRefine noise, unguided" + (f" (teacher {teacher.scale_field} {w:g})" if w is not None else "")
        for w in scales]
    return titles, [GaussianNoise(), *[RefinedNoise(refiner, guidance_scale=w) for w in scales]], sampling


@torch.no_grad()
def validation_grid(refiner: NoiseRefiner, prompts: tuple[str, ...], folder: Path, step: int,
                    acc: Accelerator | None = None) -> Path:
    """RUN/validation/step-STEP.png (see the module), sampled under the run's autocast."""
    titles, methods, sampling = validation_columns(refiner)
    backbone, seeds = refiner.backbone, list(range(len(prompts)))
    columns = []
    with acc.autocast() if acc is not None else torch.autocast("cpu", enabled=False):
        for method in methods:
            latents = generate_latents(backbone, list(prompts), seeds, method, sampling)
            columns.append(to_uint8(backbone.decode(latents).float()))
    folder.mkdir(exist_ok=True)
    return write_grid(folder / f"step-{step:06d}.png", [[col[i] for col in columns] for i in range(len(prompts))],
                      title=f"step {step}: prompt i takes noise seed i; {sampling.steps} {sampling.scheduler} "
                            "steps, unguided",
                      columns=titles, rows=list(prompts))
