"""Dry-run plans of the two long jobs, `targets` and `train` (`--dry-run`): how many images, model
evaluations, bytes on disk, and an estimate of the hours (NoiseRefine A.7 counts training cost the
same way, in model evaluations).

Hours come from measured times per model evaluation:

- this machine: forwards of the loaded denoiser (and VAE decodes) are timed here, at batch 1 and
  doubling up to the run's own batch while a forward takes under `BATCH_BUDGET_S` (per image, a
  batch runs faster than one image, so the figure at the largest batch timed is the closest);
- GPU classes: a published per-evaluation time of the same architecture at the same latent size
  (`REFERENCES`: the paper's Tab. 7, measured on an RTX 3090 at batch 1), scaled to other GPUs by
  an assumed speed-up that is a range, not a figure: between the ratio of the cards' memory
  bandwidths and the ratio of their peak dense BF16/FP16 tensor throughputs (`GPU_CLASSES`,
  vendor datasheets). A model without a reference gets no GPU line.

A training sample costs N + 1 forwards (the refiner's evaluation at T and N sampler steps) and one
backward, counted as two forwards (the usual rule of thumb, not measured), plus one recomputed
forward under gradient checkpointing.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from noiserefine.backbones.base import Backbone
from noiserefine.backbones.loading import load_backbone
from noiserefine.errors import NoiseRefineError
from noiserefine.guidance import Teacher
from noiserefine.sampling import sampler_record
from noiserefine.targets import TargetSpec
from noiserefine.train import TrainConfig, build_refiner

BACKWARD_FORWARDS = 2
"""A backward pass counted as this many forwards (rule of thumb; not measured)."""
BATCH_BUDGET_S = 1.0
"""The measurement stops doubling the batch once a forward takes longer than this."""


@dataclass(frozen=True)
class GpuClass:
    """A GPU as its datasheet gives it: peak dense BF16/FP16 tensor TFLOPS (FP32 accumulate, as
    torch's autocast runs them) and memory bandwidth in GB/s."""

    name: str
    tensor_tflops: float
    bandwidth_gbs: float


GPU_CLASSES = (
    GpuClass("RTX 3090", 71.0, 936.0),
    GpuClass("RTX 4090", 165.2, 1008.0),
    GpuClass("L40S", 362.0, 864.0),
    GpuClass("A100 80GB SXM", 312.0, 2039.0),
    GpuClass("H100 SXM", 989.0, 3352.0),
)
REFERENCE_GPU = GPU_CLASSES[0]
"""The card the references were measured on."""


@dataclass(frozen=True)
class Reference:
    """A measured time per model evaluation on `REFERENCE_GPU`, at batch 1, of a denoiser with
    `denoiser_params` parameters on latents of `latent_shape` (how a loaded model is matched)."""

    name: str
    denoiser_params: int
    latent_shape: tuple[int, ...]
    seconds_per_evaluation: float
    source: str


_TAB7 = ("NoiseRefine paper, Tab. 7 (A.6): {s} s per unguided 20-step image averaged over 30K images, batch 1, "
         "RTX 3090, text encoding and VAE decode included (resolution not stated; {px} px assumed)")
REFERENCES = (
    Reference("SD 2.1", 865_910_724, (4, 96, 96), 1.357 / 20, _TAB7.format(s=1.357, px=768)),
    Reference("SDXL", 2_567_463_684, (4, 128, 128), 3.218 / 20, _TAB7.format(s=3.218, px=1024)),
)


@dataclass(frozen=True)
class MachineCost:
    """Measured here, per image at batch `batch`: seconds per forward of the denoiser and per decode
    (None: not measured, the job decodes nothing)."""

    device: str
    dtype: str
    batch: int
    seconds_per_evaluation: float
    seconds_per_decode: float | None


@dataclass
class Plan:
    """What a job will do and cost. `evaluations` counts forward-equivalents (training: a backward
    counts `BACKWARD_FORWARDS`); `decodes` are VAE decodes (a scorer's own model is not timed)."""

    job: str
    images: str
    evaluations: int
    evaluations_note: str
    decodes: int
    disk_bytes: int
    disk_note: str
    machine: MachineCost
    reference: Reference | None

    def format(self) -> str:
        lines = [f"plan of `noiserefine {self.job}` (dry run: nothing is made or written)",
                 f"  images:            {self.images}",
                 f"  model evaluations: {self.evaluations:,} ({self.evaluations_note})"
                 + (f" + {self.decodes:,} VAE decodes" if self.decodes else ""),
                 f"  disk:              {_bytes(self.disk_bytes)} ({self.disk_note})",
                 "  hours (estimates, one process; a run on P GPUs takes about 1/P of the GPU figures):"]
        m = self.machine
        here = self.evaluations * m.seconds_per_evaluation + self.decodes * (m.seconds_per_decode or 0.0)
        decode = "" if m.seconds_per_decode is None else f" and {_duration(m.seconds_per_decode)} per decode"
        lines.append(f"    this machine ({m.device}, {m.dtype}): {_duration(here)} (measured here at batch {m.batch}: "
                     f"{_duration(m.seconds_per_evaluation)} per evaluation{decode}, per image)")
        lines += self._gpu_lines()
        return "\n".join(lines) + "\n"

    def _gpu_lines(self) -> list[str]:
        if self.reference is None:
            return ["    GPU classes: no reference measurement for this denoiser and latent size (references: "
                    + ", ".join(f"{r.name} {'x'.join(map(str, r.latent_shape))}" for r in REFERENCES)
                    + "); run the dry run on the GPU itself"]
        base = self.evaluations * self.reference.seconds_per_evaluation  # decodes are inside the reference
        lines = [f"    {REFERENCE_GPU.name}: {_duration(base)} (reference: {self.reference.source}: "
                 f"{self.reference.seconds_per_evaluation * 1e3:.0f} ms per evaluation)"]
        for gpu in GPU_CLASSES[1:]:
            low, high = sorted((gpu.bandwidth_gbs / REFERENCE_GPU.bandwidth_gbs,
                                gpu.tensor_tflops / REFERENCE_GPU.tensor_tflops))
            lines.append(f"    {gpu.name}: {_duration(base / high)} to {_duration(base / low)} (assumed {low:.2g}x to "
                         f"{high:.2g}x an {REFERENCE_GPU.name}: the ratios of memory bandwidth and of peak tensor "
                         "throughput, from the datasheets)")
        return lines


def plan_targets(prompts: Sequence[str], seeds: Sequence[int], teacher: Teacher, *, shard_size: int = 256,
                 score: str | None = None, model: str | None = None, dtype: str | None = None,
                 guide: str | None = None, batch_size: int = 64) -> Plan:
    """The plan of `api.make_targets` with the same arguments: one target per seed, each
    `teacher`'s evaluations (guide model included) and, when scored, one decode."""
    backbone = load_backbone(model, guide=guide, dtype=dtype)
    score = score or getattr(backbone, "default_scorer", None) or "none"
    spec = TargetSpec(list(prompts), list(seeds), teacher, shard_size, score)
    evaluations, note = _teacher_evaluations(spec, backbone)
    item = backbone.dtype.itemsize * 2 * _numel(backbone.latent_shape) + 4 + 4 + 8  # x_T, x_0, cfg, score, index
    manifest = len(json.dumps(spec.to_record())) + 4096  # the spec (prompts, seeds) and the rest of the record
    branches = max(teacher.at_scale(w).nfe(1) for w in teacher.scales or (None,))  # batched in one forward per step
    scored = score != "none"
    return Plan("targets", f"{len(seeds):,} targets of {len(prompts):,} prompts ({spec.num_shards:,} shards "
                f"of {shard_size}, batch {batch_size})", evaluations, note, len(seeds) if scored else 0,
                len(seeds) * item + manifest, f"{item:,} bytes per target: x_T and x_0 in "
                f"{str(backbone.dtype).removeprefix('torch.')}, plus the manifest",
                measure(backbone, batch_size * branches, decode=scored), reference_for(backbone))


def _teacher_evaluations(spec: TargetSpec, backbone: Backbone) -> tuple[int, str]:
    """Model evaluations of all targets (each at its teacher scale) and a note on them."""
    teacher, n = spec.teacher, len(spec.seeds)
    scales = [spec.pair(i)[2] for i in range(n)]
    per_scale = {w: teacher.at_scale(w).nfe(teacher.steps) for w in set(scales)}
    total = sum(per_scale[w] for w in scales)
    spacing = sampler_record(teacher.scheduler, backbone.scheduler_config, teacher.steps)["timestep_spacing"]
    sampler = f"{teacher.guidance.name}, {teacher.steps} {teacher.scheduler} steps"
    sampler += f", {spacing} spacing" if spacing else ""
    return total, f"{total / n:.3g} per target: {sampler}"


def plan_train(cfg: TrainConfig, *, model: str | None = None, dtype: str | None = None) -> Plan:
    """The plan of `train.train_refiner` with `cfg`: `steps x batch_size` target samples, each a
    refiner evaluation with gradients and `msd_steps` sampler steps; the refiner folder and its
    checkpoint (weights plus AdamW's two moments) on disk."""
    if cfg.loss == "noise":
        raise NoiseRefineError("a dry run plans the msd and full losses; the noise loss also inverts every "
                               "target, which the plan does not count")
    backbone = load_backbone(model, dtype=dtype)
    reference = reference_for(backbone)  # before the refiner's LoRA adds parameters to the denoiser
    samples, n = cfg.steps * cfg.batch_size, cfg.msd_steps
    graph = 1 if cfg.loss == "msd" else n + 1  # forwards that keep a graph for the backward
    per_sample = n + 1 + graph * (BACKWARD_FORWARDS + int(cfg.gradient_checkpointing))
    params = sum(p.numel() for p in build_refiner(backbone, cfg, {}).trainable_parameters())
    note = (f"{per_sample} per sample: {n + 1} forwards, and a backward through {graph} of them counted as "
            f"{BACKWARD_FORWARDS} forwards each" + (" plus one recomputed (gradient checkpointing)"
                                                     if cfg.gradient_checkpointing else ""))
    return Plan("train", f"{samples:,} target samples ({cfg.steps:,} steps of {cfg.batch_size})", samples * per_sample,
                note, 0, 4 * params * 4, f"{params:,} refiner parameters in fp32: the refiner and a checkpoint of it "
                "with AdamW's two moments", measure(backbone, cfg.batch_size, decode=False),
                reference)


@torch.no_grad()
def measure(backbone: Backbone, batch: int, decode: bool = True) -> MachineCost:
    """Time forwards of `backbone` at batch 1, 2, 4, ... up to `batch`, stopping once a forward
    takes over `BATCH_BUDGET_S`, and (`decode`) a decode at the last batch; per-image seconds."""
    size = 1
    while True:
        x = torch.randn(size, *backbone.latent_shape, device=backbone.device, dtype=backbone.dtype)
        t = torch.tensor(int(backbone.scheduler_config.get("num_train_timesteps", 1000)) - 1, device=backbone.device)
        cond = backbone.encode_prompts([""] * size)
        forward = _timed(lambda: backbone.predict(x, t, cond))
        if size >= batch or forward > BATCH_BUDGET_S:
            break
        size = min(2 * size, batch)
    decoding = _timed(lambda: backbone.decode(x)) / size if decode else None
    device = torch.cuda.get_device_name(backbone.device) if backbone.device.type == "cuda" else backbone.device.type
    return MachineCost(device, str(backbone.dtype).removeprefix("torch."), size, forward / size, decoding)


def reference_for(backbone: Backbone) -> Reference | None:
    """The reference measured on a denoiser of this size and latent shape, if any."""
    params = sum(p.numel() for p in backbone.denoiser.parameters())
    return next((r for r in REFERENCES if r.denoiser_params == params
                 and tuple(r.latent_shape) == tuple(backbone.latent_shape)), None)


def _timed(fn) -> float:
    """Seconds of one call of `fn`, after an untimed one (first-call allocation, kernel selection)."""
    fn()
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _bytes(n: int) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2g} {unit}" if n / size < 10 else f"{n / size:.0f} {unit}"
    return f"{n} bytes"


def _duration(seconds: float) -> str:
    """Two significant figures (the estimates carry no more), in ms, s, min or h."""
    for unit, size in (("h", 3600.0), ("min", 60.0), ("s", 1.0)):
        if seconds >= 2 * size or unit == "s" and seconds >= 0.1:
            return _two_figures(seconds / size) + " " + unit
    return _two_figures(seconds * 1e3) + " ms"


def _two_figures(x: float) -> str:
    return f"{x:.2g}" if x < 100 else f"{round(x, -len(str(int(x))) + 2):.0f}"
