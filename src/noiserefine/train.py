"""Training the noise-refining network (NoiseRefine section 3.2-3.4) with accelerate.

Losses (the `loss` option):
- "msd":   Multistep Score Distillation, Eqs. 4-5: x_hat_T = g_phi(x_T); N unguided sampler steps
           with a stop-gradient on every model output; L2 to the guided target x_0^Guide.
- "full":  the full-gradient loss, Eq. 3 (backpropagates through all N model evaluations).
- "noise": noise-space regression to the DDIM-inversion noise of the target (Tab. 1 ablation).

Batches are drawn by generators seeded with (seed, step), and each of P processes takes a
disjoint 1/P of the global batch; so a resumed run equals an uninterrupted one and a 2-process
run equals a 1-process run up to float reduction order. Each process reads from the target shards
only the items of its part of the batch (`targets.load_targets`). The sampler inside the loss
follows the model's own scheduler configuration (`sampling.make_scheduler`), as the targets'
teacher did; the refiner's card records both.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from noiserefine.backbones.base import Backbone, same_model
from noiserefine.io import OutputFolder
from noiserefine.errors import NoiseRefineError
from noiserefine.inversion import ddim_invert
from noiserefine.methods.refine import DEFAULT_TARGETS, NoiseRefiner, RefinerConfig
from noiserefine.sampling import denoise, make_scheduler, sampler_record
from noiserefine.targets import TargetSet, load_targets
from noiserefine.train_monitor import Monitoring, StepReport
from noiserefine.training_loop import LoopSettings, run_training_loop

log = logging.getLogger(__name__)

LossName = Literal["msd", "full", "noise"]
RESULTS = ("checkpoint", "refiner", "validation", "logs", "refiner.safetensors", "refiner.json")  # last two: old runs
"""What a training run writes into its folder (`OutputFolder` results; a run there resumes)."""


@dataclass
class TrainConfig:
    steps: int = 400
    batch_size: int = 32
    lr: float = 6e-4
    lr_schedule: Literal["constant", "cosine"] = "constant"  # cosine: lr * (1 + cos(pi * step / steps)) / 2
    loss: LossName = "msd"
    msd_steps: int = 10
    scheduler: str = "ddim"
    rank: int = RefinerConfig.rank  # one default for training and the refiner (refine.DEFAULT_RANK)
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    scale_conditioning: bool = False
    keep_fraction: float = 0.75
    seed: int = 0
    checkpoint_every: int = 50
    grad_clip: float = 1.0
    init_from: str | None = None  # start from a trained refiner (e.g. MSD, then fine-tune with "full")
    gradient_checkpointing: bool = False  # recompute denoiser blocks in backward (full loss, big models)
    mixed_precision: str | None = None  # "no" | "fp16" | "bf16"; None: the launcher's, else the model dtype's

    def __post_init__(self) -> None:
        sizes = {"batch_size": self.batch_size, "msd_steps": self.msd_steps, "rank": self.rank}
        if min(sizes.values()) < 1 or not self.lr > 0 or not self.grad_clip >= 0:
            raise NoiseRefineError(f"training needs batch_size, msd_steps and rank >= 1, lr > 0 and grad_clip >= 0, "
                                   f"got {sizes}, lr={self.lr}, grad_clip={self.grad_clip}")


class RefinerObjective(nn.Module):
    """The training objective as one module, so accelerate/DDP sees the refiner's parameters
    (LoRA inside the denoiser, delta head, scale projection) and averages their gradients."""

    def __init__(self, refiner: NoiseRefiner, cfg: TrainConfig) -> None:
        super().__init__()
        self.refiner = refiner
        self.denoiser = refiner.backbone.denoiser
        self.cfg = cfg

    def forward(self, x_T: torch.Tensor, x_0: torch.Tensor, prompts: list[str], w: torch.Tensor,
                inv_noise: torch.Tensor | None = None) -> torch.Tensor:
        backbone = self.refiner.backbone
        with torch.no_grad():
            cond = backbone.encode_prompts(prompts)
        x_hat = self.refiner(x_T, cond, guidance_scale=w if self.refiner.scale_proj is not None else None)
        if self.cfg.loss == "noise":
            return torch.nn.functional.mse_loss(x_hat, inv_noise)
        sched = make_scheduler(self.cfg.scheduler, backbone.scheduler_config)
        x0_hat = denoise(backbone, sched, x_hat, cond, steps=self.cfg.msd_steps, grad_mode=self.cfg.loss)
        return torch.nn.functional.mse_loss(x0_hat, x_0)  # Eq. 4: d = L2 in latent space


def _global_batch(cfg: TrainConfig, step: int, n: int) -> np.ndarray:
    return np.random.default_rng([cfg.seed, step]).choice(n, size=cfg.batch_size, replace=n < cfg.batch_size)


def train_refiner(backbone: Backbone, targets: Path | Sequence[Path], out: Path, cfg: TrainConfig = TrainConfig(),
                  accelerator: Accelerator | None = None, progress: bool = True, overwrite: bool = False,
                  monitoring: Monitoring = Monitoring()) -> Path:
    """Train (or resume) a refiner on one or more target folders. Writes the refiner folder `out/refiner`
    (`NoiseRefiner.save_pretrained`: a PEFT adapter folder + noiserefine.json + model card) and returns it;
    checkpoints under `out/checkpoint` (atomic, every `checkpoint_every` steps). `overwrite` deletes an
    earlier run in `out` (once the inputs are validated) instead of resuming it. `monitoring` adds an
    experiment tracker (loss and learning rate per step) and validation grids every K steps
    (`noiserefine.train_monitor`; the tracker needs the Accelerator made here)."""
    monitoring.check()
    acc = accelerator or Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=_mixed_precision(cfg, backbone),
                                     **monitoring.accelerator_kwargs(Path(out)))
    folder = OutputFolder(Path(out), RESULTS, overwrite=overwrite, resume=True).check()
    out = Path(out)
    loop = LoopSettings(out / "checkpoint", cfg.steps, lr_schedule=cfg.lr_schedule,
                        checkpoint_every=cfg.checkpoint_every, config=_comparable(cfg), desc=f"train ({cfg.loss})",
                        progress=progress, is_main_process=acc.is_main_process,
                        wait_for_everyone=acc.wait_for_everyone)
    data = load_targets(targets, cfg.keep_fraction)
    _check_base(data, backbone)
    if cfg.batch_size % acc.num_processes:
        raise NoiseRefineError(f"batch size {cfg.batch_size} must divide by {acc.num_processes} processes")
    spec = data.manifest["spec"]
    teacher = spec["teacher"]
    torch.manual_seed(cfg.seed)
    refiner = build_refiner(backbone, cfg, teacher)
    if cfg.init_from:
        refiner.load_weights_from(cfg.init_from)
    _trainable_in_fp32(refiner, acc)
    if cfg.gradient_checkpointing:
        refiner.enable_gradient_checkpointing()
    objective = RefinerObjective(refiner, cfg)
    params = refiner.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    objective, opt = acc.prepare(objective, opt)
    inv = _inversion_noise(backbone, data, cfg) if cfg.loss == "noise" else None
    folder.open()  # after validation; under `overwrite` the old run goes before the loop could resume it
    log.info("training a refiner (%s loss) on %d targets for %d steps, batch %d on %d process(es), into %s",
             cfg.loss, len(data), cfg.steps, cfg.batch_size, acc.num_processes, out)
    report = StepReport(monitoring, acc, refiner, out, asdict(cfg))
    run = run_training_loop(replace(loop, on_step=report), {"refiner": _RefinerState(refiner)}, opt,
                            lambda step: _train_step(objective, opt, params, data, inv, cfg, step, acc))
    report.close()
    path = out / "refiner"
    if acc.is_main_process:
        refiner.save_pretrained(path, {"training": asdict(cfg), "targets": _names(targets), "num_targets": len(data),
                                       "sampler": sampler_record(cfg.scheduler, backbone.scheduler_config, cfg.msd_steps),
                                       "teacher_sampler": data.manifest["sampler"],
                                       "final_loss_avg20": float(np.mean(run.losses[-20:])),
                                       "train_seconds_this_run": round(run.seconds, 1)})
    acc.wait_for_everyone()
    log.info("wrote refiner %s", path)
    return path


def build_refiner(backbone: Backbone, cfg: TrainConfig, teacher: dict) -> NoiseRefiner:
    """A fresh refiner of `cfg`'s architecture on `backbone`, recording `teacher` (a `Teacher` record)."""
    defaults = dict(getattr(backbone, "refiner_defaults", {}))  # e.g. DiT's output layer name
    return NoiseRefiner(backbone, RefinerConfig(**defaults, rank=cfg.rank, alpha=float(cfg.rank),
                                                target_modules=cfg.target_modules,
                                                scale_conditioning=cfg.scale_conditioning, teacher=teacher))


def _train_step(objective, opt, params, data: TargetSet, inv, cfg: TrainConfig, step: int,
                acc: Accelerator) -> float:
    idx = _global_batch(cfg, step, len(data))
    per = cfg.batch_size // acc.num_processes
    mine = idx[acc.process_index * per: (acc.process_index + 1) * per]
    dev = acc.device
    x_T, x_0 = data.x_T[mine].to(dev), data.x_0[mine].to(dev)
    prompts = [data.prompts[i] for i in mine]
    loss = objective(x_T, x_0, prompts, data.cfg[mine].to(dev), None if inv is None else inv[mine].to(dev))
    opt.zero_grad(set_to_none=True)
    acc.backward(loss)
    if cfg.grad_clip:
        acc.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()  # at the learning rate of `step`, set by the training loop's schedule
    return float(acc.reduce(loss.detach(), reduction="mean"))


def _inversion_noise(backbone: Backbone, data: TargetSet, cfg: TrainConfig) -> torch.Tensor:
    """DDIM-inversion noise of every target (unguided, N steps), for the noise-space loss."""
    chunks = []
    for lo in tqdm(range(0, len(data), 64), desc="inverting targets", leave=False):
        cond = backbone.encode_prompts(data.prompts[lo: lo + 64])
        chunks.append(ddim_invert(backbone, data.x_0[lo: lo + 64].to(backbone.device), cond, steps=cfg.msd_steps).cpu())
    return torch.cat(chunks)


def _names(targets: Path | Sequence[Path]) -> str | list[str]:
    return str(targets) if isinstance(targets, (str, Path)) else [str(t) for t in targets]


def _mixed_precision(cfg: TrainConfig, backbone: Backbone) -> str:
    """The autocast mode: as configured, else as `accelerate launch --mixed_precision`, else the
    one that matches the model's dtype (fp16/bf16 weights need autocast around fp32 LoRA)."""
    by_dtype = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(backbone.dtype, "no")
    return cfg.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION") or by_dtype


def _trainable_in_fp32(refiner: NoiseRefiner, acc: Accelerator) -> None:
    """Mixed-precision training as in diffusers' LoRA scripts: the frozen base stays in its low
    precision, the refiner's own weights (and so the optimizer state) are fp32, autocast does the rest."""
    if refiner.backbone.dtype != torch.float32 and acc.mixed_precision == "no":
        raise NoiseRefineError(f"the model is {refiner.backbone.dtype}: train with mixed precision "
                               "(--mixed-precision fp16/bf16) so the refiner's weights stay fp32")
    for p in refiner.trainable_parameters():
        p.data = p.data.float()


def _check_base(data: TargetSet, backbone: Backbone) -> None:
    if not same_model(data.manifest["base"], backbone.fingerprint()):
        raise NoiseRefineError(
            f"targets were generated by {data.manifest['base']}, the model here is {backbone.fingerprint()}")


def _comparable(cfg: TrainConfig) -> dict:
    """The configuration a resumed run must share (the step budget may grow)."""
    d = asdict(cfg)
    d.pop("steps")
    d.pop("gradient_checkpointing")  # changes memory, not the result
    return d


class _RefinerState(nn.Module):
    """Adapter so the checkpoint helper can save/restore the refiner's own weights."""

    def __init__(self, refiner: NoiseRefiner) -> None:
        super().__init__()
        self._refiner = [refiner]  # not a submodule: avoid re-registering the backbone

    def state_dict(self, *args, **kwargs):
        return self._refiner[0].refiner_state_dict()

    def load_state_dict(self, state, strict: bool = True):
        self._refiner[0].load_refiner_state_dict(state)
