"""What the report's measuring items share: the shipped models (loaded once per process), scores
under both judges with their standard errors, bench rows and sampled images on the report's split,
each cached in the report folder (`ReportContext.cached_json` / `cached_tensors`).

Adherence is a share of n images, so its standard error is the binomial sqrt(p (1 - p) / n); two
samplings of the same prompts and seeds are compared by their paired difference, whose standard
error is that of the per-image differences (much smaller than the unpaired one when most images
agree).
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from noiserefine.api import load_refiner
from noiserefine.backbones.loading import load_backbone
from noiserefine.evaluation.bench import BenchSetup, RowSpec, bench_setup, parse_row, run_rows
from noiserefine.evaluation.judge import ATTRIBUTES, Judge, attribute_labels, load_judges
from noiserefine.evaluation.metrics import score_images
from noiserefine.evaluation.timing import DEFAULT_ROUNDS
from noiserefine.generation import NoiseMethod, SamplingOptions, sample_from_noise
from noiserefine.guidance import Teacher
from noiserefine.io import read_json, shipped_path
from noiserefine.methods import registry
from noiserefine.methods.refine import NoiseRefiner
from noiserefine.methods.refiner_folder import META_FILE
from noiserefine.methods.registry import MethodContext
from noiserefine.sampling import as_saved, noise_for_seeds
from noiserefine.world.shapes16 import parse_prompt

from noiserefine.report.core import ReportContext

BATCH = 250
SHIPPED_REFINER = "shapes16-refiner"


@functools.cache
def judges() -> dict[str, Judge]:
    """Both shipped judges (primary, held-out), loaded once per process."""
    return load_judges()


@functools.cache
def refiner() -> NoiseRefiner:
    """The shipped refiner on its own copy of the shipped base model (with its guide model)."""
    return load_refiner()


def teacher(folder: Path | None = None) -> Teacher:
    """The teacher a refiner folder's card records (default: the shipped refiner's), read without
    loading the model."""
    meta = read_json((folder or shipped_path(SHIPPED_REFINER)) / META_FILE)
    return Teacher.from_record(meta["config"]["teacher"])


def setup(ctx: ReportContext, n: int) -> BenchSetup:
    """The first n prompts and seeds of the report's split (the bench's draw)."""
    return bench_setup(n, min(n, BATCH), split=ctx.split)


def se(p: float, n: int) -> float:
    """Binomial standard error of a share p of n."""
    return math.sqrt(max(p * (1.0 - p), 0.0) / n)


def correct(judge: Judge, images: torch.Tensor, prompts: Sequence[str]) -> list[int]:
    """Per image: 1 when `judge` reads all three attributes of its prompt, else 0."""
    targets = attribute_labels([parse_prompt(p) for p in prompts])
    with torch.no_grad():
        logits = judge.logits(images)
    return torch.stack([logits[a].argmax(-1) == targets[a] for a in ATTRIBUTES]).all(0).int().tolist()


def score(images: torch.Tensor, prompts: Sequence[str]) -> dict[str, Any]:
    """`score_images` under both judges, plus n, the adherences' standard errors and the per-image
    verdicts (`correct`, `heldout_correct`) that paired differences need."""
    out: dict[str, Any] = dict(score_images(images, prompts, judges()))
    n = len(prompts)
    out |= {"n": n, "adherence_se": se(out["adherence"], n), "heldout_adherence_se": se(out["heldout_adherence"], n),
            "correct": correct(judges()["primary"], images, prompts),
            "heldout_correct": correct(judges()["heldout"], images, prompts)}
    return out


def paired(a: Mapping[str, Any], b: Mapping[str, Any], key: str = "correct") -> tuple[float, float]:
    """Adherence of a minus that of b over the images both scored (the first ones: the same prompts
    and seeds), and its standard error."""
    m = min(len(a[key]), len(b[key]))
    d = np.asarray(a[key][:m], dtype=float) - np.asarray(b[key][:m], dtype=float)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(m)) if m > 1 else float("nan")


def bench_rows(ctx: ReportContext, name: str, rows: Sequence[str], n: int,
               weights: Mapping[str, Path] | None = None, rounds: int = DEFAULT_ROUNDS) -> list[dict[str, Any]]:
    """Bench records (`evaluation.bench.run_rows`: timed in interleaved rounds, DDIM) of `rows` on
    the first n images of the split, scored by `score`; cached as DIR/cache/<name>-<hash of the
    rows>.json, so a cache of other rows is never read back as these."""
    def compute() -> dict[str, Any]:
        backbone = load_backbone()
        methods = MethodContext(backbone, weights=dict(weights or {}))
        specs = [replace(parse_row(r), scheduler="ddim") for r in rows]

        def build(spec: RowSpec, done: list[dict]) -> NoiseMethod:
            sampling = SamplingOptions(spec.guidance, spec.steps, spec.scheduler, BATCH)
            return registry.build(spec.method, replace(methods, sampling=sampling), **dict(spec.options))

        records = run_rows(backbone, specs, build, setup(ctx, n), score, rounds=1 if ctx.quick else rounds,
                           progress=True)
        return {"rows": [r | {"torch_threads": torch.get_num_threads()} for r in records]}
    digest = hashlib.sha256(",".join(rows).encode()).hexdigest()[:8]
    return ctx.cached_json(f"{name}-{digest}", compute)["rows"]


def sampled(ctx: ReportContext, name: str, make_noise: Callable[[], torch.Tensor], prompts: Sequence[str],
            options: SamplingOptions = SamplingOptions(steps=20)) -> torch.Tensor:
    """Images (as saved: 8-bit) sampled with `options` from the noise `make_noise()` gives for
    `prompts`, on the shipped model; cached as DIR/cache/<name>.safetensors."""
    def compute() -> dict[str, torch.Tensor]:
        noise, backbone = make_noise(), refiner().backbone
        parts = [sample_from_noise(backbone, noise[i:i + BATCH], prompts[i:i + BATCH], options)
                 for i in range(0, len(prompts), BATCH)]
        return {"images": as_saved(backbone.decode(torch.cat(parts)))}
    return ctx.cached_tensors(name, compute)["images"]


def gaussian(seeds: Sequence[int]) -> torch.Tensor:
    """Unit Gaussian noise of the shipped model's shape, one generator per seed."""
    return noise_for_seeds(list(seeds), refiner().backbone.latent_shape)


@torch.no_grad()
def delta(noise: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """delta_phi(noise, c) of the shipped refiner (the refined noise is noise + delta)."""
    return refiner().delta(noise, refiner().encode_prompts(list(prompts)))


def refinement(ctx: ReportContext, n: int) -> torch.Tensor:
    """delta_phi(x_T, c) of the shipped refiner for the split's first n seeds and prompts (cached)."""
    def compute() -> dict[str, torch.Tensor]:
        s = setup(ctx, n)
        return {"delta": delta(gaussian(s.seeds), s.prompts)}
    return ctx.cached_tensors(f"delta-n{n}", compute)["delta"]


def closer_to(images: torch.Tensor, start: torch.Tensor, goal: torch.Tensor) -> float:
    """Share of images nearer (pixel L2) to `goal`'s image than to `start`'s, the same noises'
    images (e.g. x_T's and x_hat_T's), among those whose start and goal images differ at all."""
    def dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a - b).flatten(1).norm(dim=1)

    differ = dist(start, goal) > 0
    nearer = dist(images, goal) < dist(images, start)
    return float(nearer[differ].float().mean()) if differ.any() else float("nan")
