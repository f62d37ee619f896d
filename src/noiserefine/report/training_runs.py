"""The shared runs behind the report's training ablations (NoiseRefine Tab. 1, 14, 15): ONE target set
made by the shipped refiner's teacher, short refiners trained on it with the same budget, and their
evaluation on the bench split -- every piece cached under DIR/cache/training, so a re-run reuses it and
a killed run resumes (the target store and the training loop resume by themselves).

Refiner variants (`VARIANTS`): "msd10" (the paper's recipe: MSD loss, Eqs. 4-5, N = 10), "msd5"
(N = 5, Tab. 15), "noise" (noise-space regression to the DDIM-inversion noise of the target, Tab. 1)
-- LoRA refiners trained by `train.train_refiner` -- and "scratch" (the base's architecture trained
from a random initialisation, Tab. 14; `report.scratch_refiner`). "gaussian" is the unrefined noise.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from noiserefine.backbones.base import Backbone
from noiserefine.backbones.loading import load_backbone
from noiserefine.evaluation.bench import bench_setup
from noiserefine.evaluation.judge import Judge
from noiserefine.evaluation.metrics import frechet_distance, judge_features, reference_features
from noiserefine.evaluation.scorers import scorer_for
from noiserefine.generation import GaussianNoise, NoiseMethod, SamplingOptions, generate_latents
from noiserefine.io import read_json, shipped_path
from noiserefine.methods.refine import NoiseRefiner, RefinedNoise
from noiserefine.report import measure
from noiserefine.report.core import ReportContext
from noiserefine.report.scratch_refiner import ScratchNoise, is_trained, train_scratch
from noiserefine.sampling import as_saved
from noiserefine.targets import TargetSpec, generate_targets
from noiserefine.train import TrainConfig, train_refiner
from noiserefine.world.shapes16 import ALL_PROMPTS

SHIPPED_CARD = f"{measure.SHIPPED_REFINER}/noiserefine.json"
VARIANTS: dict[str, dict[str, Any]] = {
    "msd10": {"loss": "msd", "msd_steps": 10},
    "msd5": {"loss": "msd", "msd_steps": 5},
    "noise": {"loss": "noise", "msd_steps": 10},  # the inversion runs N = 10 unguided DDIM steps
    "scratch": {"loss": "msd", "msd_steps": 10},
}
LABELS = {"gaussian": "Gaussian (no refiner)", "msd10": "MSD, N = 10 (LoRA)", "msd5": "MSD, N = 5 (LoRA)",
          "noise": "noise-space loss (LoRA)", "scratch": "MSD, N = 10, from scratch"}


@dataclass(frozen=True)
class Sizes:
    """How big the shared runs are: `targets` seeds (the best `keep` fraction trained on, as in the
    shipped recipe), refiners of `steps` optimizer steps of `batch`, `n` bench images per row,
    `few_steps` for the few-step rows; Fig. 3 inverts `inversions` targets; Figs. 6/35/36 optimise
    `noises` noises for `iterations` Adam steps through an `optimisation_steps`-step sampler and
    measure memory at batch `memory_batch`; the FD's standard error takes `bootstrap` resamples."""

    targets: int
    steps: int
    batch: int
    n: int
    inversions: int
    noises: int
    iterations: int
    memory_batch: int
    optimisation_steps: int
    bootstrap: int
    few_steps: int = 5
    keep: float = TrainConfig.keep_fraction

    @property
    def tag(self) -> str:
        return f"t{self.targets}-s{self.steps}-b{self.batch}"

    def describe(self) -> str:
        card = read_json(shipped_path(SHIPPED_CARD))
        stages = [card["training"]] + ([card["stage1"]["training"]] if "stage1" in card else [])
        return (f"refiners of {self.steps} step{'s' * (self.steps != 1)} (batch {self.batch}) on the best {round(self.keep * self.targets):,} "
                f"of {self.targets:,} targets; the shipped one has {sum(t['steps'] for t in stages)} steps (batch "
                f"{card['training']['batch_size']}) on the best {card['num_targets']:,} of {card['targets']}; "
                f"{self.n} bench images per row")


FULL = Sizes(targets=512, steps=60, batch=16, n=200, inversions=256, noises=4, iterations=50, memory_batch=16,
             optimisation_steps=10, bootstrap=100)
QUICK = Sizes(targets=8, steps=1, batch=4, n=6, inversions=8, noises=2, iterations=2, memory_batch=2,
              optimisation_steps=3, bootstrap=10)


def sizes(ctx: ReportContext) -> Sizes:
    return QUICK if ctx.quick else FULL


def _folder(ctx: ReportContext, name: str) -> Path:
    path = ctx.cache_dir / "training" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


_FINISHED: set[Path] = set()  # target folders this process has made or checked complete


def shared_targets(ctx: ReportContext) -> Path:
    """The one target set of every training item: seeds 0..K-1, the 48 prompts in turn, the shipped
    refiner's teacher, scored by the primary judge (made, or resumed, on first use)."""
    size = sizes(ctx)
    folder = _folder(ctx, f"targets-{size.targets}")
    if folder not in _FINISHED:
        spec = TargetSpec(list(ALL_PROMPTS), list(range(size.targets)), measure.teacher(), shard_size=256, score="judge")
        backbone = load_backbone()
        _FINISHED.add(generate_targets(backbone, spec, folder, scorer_for(backbone, "judge")))
    return folder


def train_config(ctx: ReportContext, variant: str) -> TrainConfig:
    """`TrainConfig`'s defaults (lr, rank, keep fraction, ...) at the report's budget, with the variant's loss."""
    size = sizes(ctx)
    return replace(TrainConfig(steps=size.steps, batch_size=size.batch, checkpoint_every=max(1, size.steps // 4)),
                   **VARIANTS[variant])


def trained(ctx: ReportContext, variant: str) -> Path:
    """The run folder of `variant`, trained (or resumed) on the shared targets."""
    out = _folder(ctx, f"{variant}-{sizes(ctx).tag}")
    if variant == "scratch":
        return out if is_trained(out) else train_scratch(load_backbone(), shared_targets(ctx), out,
                                                         train_config(ctx, variant))
    if not (out / "refiner" / "noiserefine.json").is_file():
        train_refiner(load_backbone(), shared_targets(ctx), out, train_config(ctx, variant))
    return out


def noise_method(ctx: ReportContext, variant: str) -> tuple[Backbone, NoiseMethod]:
    """A fresh backbone (a backbone carries one refiner) and the variant's noise method on it."""
    backbone = load_backbone()
    if variant == "gaussian":
        return backbone, GaussianNoise()
    run = trained(ctx, variant)
    if variant == "scratch":
        return backbone, ScratchNoise.load(backbone, run)
    return backbone, RefinedNoise(NoiseRefiner.load(backbone, run / "refiner"))


def evaluation(ctx: ReportContext, variant: str, steps: int = 20) -> dict[str, Any]:
    """Scores of `variant` sampled unguided in `steps` DDIM steps on the first n images of the bench
    split (cached): `measure.score` (both judges' adherence with its standard error and per-image
    verdicts for paired differences, FD), the FD's bootstrap standard error, and each image's MSE to
    the teacher's image of the same noise (`teacher_images`)."""
    size = sizes(ctx)
    tag = "" if variant == "gaussian" else f"-{size.tag}"
    return ctx.cached_json(f"training-eval-{variant}{tag}-steps{steps}-{ctx.split}-n{size.n}",
                           lambda: _evaluate(ctx, variant, steps))


def _evaluate(ctx: ReportContext, variant: str, steps: int) -> dict[str, Any]:
    size = sizes(ctx)
    setup = bench_setup(size.n, 64, split=ctx.split)
    backbone, method = noise_method(ctx, variant)
    latents = generate_latents(backbone, setup.prompts, setup.seeds, method, SamplingOptions(steps=steps, batch_size=64),
                               progress=True)
    images = as_saved(backbone.decode(latents))  # as the bench scores them: 8-bit, as a PNG holds them
    record = {"variant": variant, "steps": steps, "split": ctx.split, **measure.score(images, setup.prompts)}
    for name, judge in measure.judges().items():
        record[("" if name == "primary" else f"{name}_") + "fd_se"] = fd_bootstrap_se(judge, images, size.bootstrap)
    teacher_mse = (images - teacher_images(ctx)).pow(2).flatten(1).mean(1)
    return record | {"teacher_mse": teacher_mse.tolist(), "teacher_mse_mean": float(teacher_mse.mean()),
                     "teacher_mse_se": float(teacher_mse.std() / len(teacher_mse) ** 0.5) if len(teacher_mse) > 1 else 0.0}


def teacher_images(ctx: ReportContext) -> torch.Tensor:
    """The refiners' teacher (the shipped refiner's: autoguidance 3, 20 DDIM steps) on the rows'
    prompts and seeds: what distillation aims at, so each row's per-image MSE to these images is
    Eq. 4's distance d(x_hat_0, x_0^Guide) on held-out noise (cached)."""
    size, teacher = sizes(ctx), measure.teacher()
    setup = bench_setup(size.n, 64, split=ctx.split)
    options = SamplingOptions(teacher.guidance, teacher.steps, teacher.scheduler)
    return measure.sampled(ctx, f"training-teacher-{ctx.split}-n{size.n}", lambda: measure.gaussian(setup.seeds),
                           setup.prompts, options)


def fd_bootstrap_se(judge: Judge, images: torch.Tensor, resamples: int, seed: int = 0) -> float:
    """Standard error of the FD over the generated images (resampled with replacement; the 2,000
    reference renders fixed)."""
    feats, ref = judge_features(judge, images), reference_features(judge)
    rng = np.random.default_rng(seed)
    values = [frechet_distance(feats[rng.integers(0, len(feats), len(feats))], ref) for _ in range(resamples)]
    return float(np.std(values, ddof=1))
