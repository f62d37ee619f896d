"""`noiserefine bench` (DESIGN.md section 4): every method in ONE process, on the same prompts
and seeds, with time per image, model evaluations, memory, adherence and FD under two judges.

A row is written `method[@opt+opt...]`, options `cfgW`, `pagS`, `autoA` (autoguidance with the
backbone's guide model), `startF`/`stopF` (guidance interval), `stepsN`, `nN` (fewer images for an
expensive row: the first N of the same prompts and seeds), `strengthS`. Examples: `gaussian`,
`gaussian@cfg5`, `gaussian@cfg2+pag3`, `gaussian@auto2`, `refined@steps5`, `noise-diffusion@n200`.
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from noiserefine.backbones.base import Backbone
from noiserefine.backbones.loading import load_backbone
from noiserefine.backbones.shapes16 import Shapes16Backbone
from noiserefine.errors import NoiseRefineError
from noiserefine.generation import SamplingOptions, generate_latents
from noiserefine.guidance import Guidance, check_guide
from noiserefine.io import ensure_out_dir, write_json
from noiserefine.generation import NoiseMethod
from noiserefine.sampling import as_saved
from noiserefine.world.shapes16 import ALL_PROMPTS

PROMPT_SEED = 20241121  # fixed: every bench draws the same prompts
NOISE_SEED_OFFSET = 1_000_000  # bench seeds never overlap training-target seeds (0..~10^5)
# The full bench takes 14.5-17 minutes on 2 shared CPU cores: rows not needed at 1,000 images
# run on the first 300 (200 for the per-sample search methods) of the same prompts and seeds.
REAL_MODEL_ROWS = "gaussian,gaussian@cfg7.5,gaussian@pag3,gaussian@cfg7.5+pag3"  # + refined with --refiner
DEFAULT_ROWS = ("gaussian,gaussian@cfg2,refined,refined@steps5,gaussian@steps5,gaussian@cfg1.25+n300,"
                "gaussian@cfg3+n300,gaussian@cfg2.5+pag1.5+start0.6,gaussian@pag3+n300,gaussian@auto3,"
                "golden,golden@cfg2+n300,noise-diffusion@n200,best-of-n@n200")


@dataclass
class RowSpec:
    method: str
    cfg: float = 1.0
    pag: float = 0.0
    steps: int = 20
    n: int | None = None
    strength: float = 1.0
    start: float = 0.0
    stop: float = 1.0
    auto: float = 1.0

    @property
    def guidance(self) -> Guidance:
        return Guidance(self.cfg, self.pag, self.start, self.stop, self.auto)

    @property
    def label(self) -> str:
        g = self.guidance.name
        extra = (f", {self.steps} steps" if self.steps != 20 else "") + (
            f", s={self.strength:g}" if self.strength != 1.0 else "")
        return f"{self.method} ({g}{extra})"


def parse_row(text: str) -> RowSpec:
    method, _, opts = text.strip().partition("@")
    spec = RowSpec(method=method)
    for opt in filter(None, opts.split("+")):
        m = re.fullmatch(r"(cfg|pag|auto|steps|n|strength|start|stop)([0-9.]+)", opt)
        if not m:
            raise NoiseRefineError(f"bad bench row option {opt!r} in {text!r}")
        key, val = m.groups()
        setattr(spec, key, int(val) if key in ("steps", "n") else float(val))
    spec.guidance  # a bad scale or interval fails while parsing, before any row runs
    return spec


@dataclass
class BenchSetup:
    prompts: list[str]
    seeds: list[int]
    batch_size: int


def bench_setup(n: int, batch_size: int, prompt_pool: Sequence[str] = ALL_PROMPTS) -> BenchSetup:
    """n prompts drawn uniformly from `prompt_pool` with a fixed seed, and n fixed noise seeds."""
    if not prompt_pool:
        raise NoiseRefineError("the bench needs at least one prompt")
    rng = np.random.default_rng(PROMPT_SEED)
    prompts = [prompt_pool[i] for i in rng.integers(0, len(prompt_pool), size=n)]
    return BenchSetup(prompts, [NOISE_SEED_OFFSET + i for i in range(n)], batch_size)


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 5 ms (CPU), or CUDA's own
    peak counter on a GPU."""

    def __enter__(self) -> "PeakRSS":
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_row(backbone: Backbone, spec: RowSpec, method: NoiseMethod, setup: BenchSetup,
            score: Callable[[torch.Tensor, list[str]], dict[str, float]]) -> tuple[dict[str, Any], torch.Tensor]:
    """Time one row (after a one-batch warm-up) and score it."""
    n = min(spec.n or len(setup.prompts), len(setup.prompts))
    prompts, seeds = setup.prompts[:n], setup.seeds[:n]
    options = SamplingOptions(spec.guidance, spec.steps, "ddim", setup.batch_size)
    warm = min(setup.batch_size, n, 32)  # two steps touch every code path; timing starts after
    generate_latents(backbone, prompts[:warm], seeds[:warm], method, replace(options, steps=min(spec.steps, 2)))
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        latents = generate_latents(backbone, prompts, seeds, method, options)
        images = as_saved(backbone.decode(latents))
        seconds = time.perf_counter() - t0
    nfe = spec.guidance.nfe(spec.steps) + method.extra_nfe
    row = {"row": spec.label, "method": spec.method, "cfg": spec.cfg, "pag": spec.pag, "steps": spec.steps,
           "guidance_start": spec.start, "guidance_stop": spec.stop, "auto": spec.auto,
           "n_images": n, "nfe_per_image": round(float(getattr(method, "stats", {}).get("nfe_per_image", nfe)), 2),
           "sec_per_image": seconds / n, "peak_mem_mb": round(mem.extra_mb, 1),
           **score(images, prompts), **getattr(method, "stats", {})}
    return row, images


def run_bench(out: Path, n: int = 1000, batch_size: int = 250, rows: str = "default",
              refiner: Path | None = None, model: str | None = None, progress: bool = True,
              prompts: Sequence[str] | None = None, clip_model: str | None = None, dtype: str | None = None,
              force: bool = False, guide: str | None = None) -> Path:
    """Run the benchmark; writes `out/bench.md` and `out/bench.json` and returns the .md path.

    On the embedded shapes16 model rows are scored by the two judges (adherence, FD). On a real
    model (`model` = a pipeline folder or hub id) rows carry time, model evaluations and memory,
    plus the CLIP score when `clip_model` names a local CLIP folder; prompts come from `prompts`
    (default: the shapes16 prompts, which any text-to-image model can read).
    """
    from noiserefine.api import build_method, load_refiner
    from noiserefine.methods.refine import RefinedNoise

    out = ensure_out_dir(out)
    specs = [parse_row(r) for r in (DEFAULT_ROWS if rows == "default" else rows).split(",")]
    backbone = load_backbone(model, guide=guide, dtype=dtype)
    for spec in specs:
        check_guide(backbone, spec.guidance)
    shapes16 = isinstance(backbone, Shapes16Backbone)
    if rows == "default" and not shapes16:
        specs = [parse_row(r) for r in REAL_MODEL_ROWS.split(",") + (["refined"] if refiner else [])]
    score = _judge_score() if shapes16 else _real_score(clip_model, backbone)
    setup = bench_setup(n, batch_size, list(prompts or ALL_PROMPTS))
    methods = {s.method: None for s in specs}
    loaded = load_refiner(backbone, refiner, force) if "refined" in methods else None  # attach once
    teacher = _teacher(loaded)
    if teacher is not None and not any(_same_guidance(s, teacher) for s in specs):
        specs.insert(1, teacher)  # the refiner's teacher row must be in the same run
    results = []
    for spec in tqdm(specs, desc="bench rows", disable=not progress):
        method = (RefinedNoise(loaded, spec.strength) if spec.method == "refined"
                  else build_method(spec.method, backbone, **_method_opts(spec, results)))
        row, _ = run_row(backbone, spec, method, setup, score)
        if spec.method == "refined" and teacher is not None:
            row |= {"teacher_cfg": teacher.cfg, "teacher_pag": teacher.pag,
                    "teacher_guidance_start": teacher.start, "teacher_guidance_stop": teacher.stop}
        results.append(row)
    reference = teacher or next((s for s in specs if s.method == "gaussian" and s.cfg != 1 and s.pag == 0
                                 and not s.guidance.uses_auto and not s.guidance.limited), specs[0])
    ref_row = next(r for r in results if r["row"] == reference.label)
    for r in results:
        r["ratio_to_cfg"] = r["sec_per_image"] / ref_row["sec_per_image"]
    meta = {"n": n, "batch_size": batch_size, "sampler": "ddim (trailing)", "reference_row": reference.label,
            "torch_threads": torch.get_num_threads(), "device": str(backbone.device), "methods": list(methods),
            "model": model or "shapes16", "backbone": type(backbone).__name__, "dtype": str(backbone.dtype).removeprefix("torch.")}
    write_json(out / "bench.json", {"meta": meta, "rows": results})
    (out / "bench.md").write_text((format_table if shapes16 else format_real_table)(results, meta))
    return out / "bench.md"


def _judge_score() -> Callable[[torch.Tensor, list[str]], dict[str, float]]:
    from noiserefine.evaluation.judge import load_judges
    from noiserefine.evaluation.metrics import score_images

    judges = load_judges()
    return lambda images, prompts: score_images(images, prompts, judges)


def _real_score(clip_model: str | None, backbone: Backbone) -> Callable[[torch.Tensor, list[str]], dict[str, float]]:
    """CLIP score (mean over the row) from a local CLIP folder, or nothing to score with."""
    if clip_model is None:
        return lambda images, prompts: {}
    from noiserefine.evaluation.scorers import CLIPScorer

    scorer = CLIPScorer(clip_model, backbone.device)
    return lambda images, prompts: {"clip_score": float(torch.cat(
        [scorer(images[i: i + 64], prompts[i: i + 64]) for i in range(0, len(prompts), 64)]).mean())}


def _teacher(refiner) -> RowSpec | None:
    """The Gaussian row with the refiner's teacher guidance (None without a single teacher)."""
    if refiner is None:
        return None
    teacher = refiner.meta["config"].get("teacher", {})
    if len(teacher.get("cfg", [])) != 1:
        return None  # a scale-conditioned (or untrained) refiner has no single teacher
    g = Guidance.of_teacher(teacher)
    return RowSpec("gaussian", cfg=g.cfg, pag=g.pag, steps=int(teacher["steps"]), start=g.start, stop=g.stop)


def _same_guidance(a: RowSpec, b: RowSpec) -> bool:
    return (a.method, a.guidance, a.steps, a.n) == (b.method, b.guidance, b.steps, b.n)


def _method_opts(spec: RowSpec, results: list[dict]) -> dict[str, Any]:
    """Search methods score what the row samples (its guidance and steps); best-of-n gets the
    scorer budget Noise Diffusion used earlier in the same run."""
    if spec.method not in ("noise-diffusion", "best-of-n"):
        return {}
    opts: dict[str, Any] = {"cfg": spec.cfg, "pag": spec.pag, "steps": spec.steps,
                            "guidance_start": spec.start, "guidance_stop": spec.stop, "auto": spec.auto}
    nd = [r for r in results if r["method"] == "noise-diffusion" and "scorer_calls_per_image" in r]
    if spec.method == "best-of-n" and nd:
        opts["budget"] = max(1, round(nd[-1]["scorer_calls_per_image"]))
    return opts


def format_table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    head = ("| row | NFE/img | s/img | x CFG-ref time | adherence | held-out adh. | color | shape | position "
            "| FD | held-out FD | peak MB |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r['row']}{_subset(r, meta)} | {r['nfe_per_image']:g} "
        f"| {r['sec_per_image'] * 1e3:.2f} ms | {r['ratio_to_cfg']:.2f} | {r['adherence']:.3f} "
        f"| {r.get('heldout_adherence', float('nan')):.3f} | {r['acc_color']:.3f} | {r['acc_shape']:.3f} "
        f"| {r['acc_position']:.3f} | {r['fd']:.1f} | {r.get('heldout_fd', float('nan')):.1f} | {r['peak_mem_mb']:.0f} |\n"
        for r in rows)
    note = (f"\n{meta['n']} images per row (same prompts and seeds), {meta['sampler']}, batch {meta['batch_size']}, "
            f"{meta['torch_threads']} torch thread(s) on {meta['device']}; time ratio is to `{meta['reference_row']}`.\n")
    return head + body + note


def format_real_table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The table for a real model: cost columns, and the CLIP score where one was computed."""
    clip = any("clip_score" in r for r in rows)
    head = "| row | NFE/img | s/img | x CFG-ref time |" + (" CLIP score |" if clip else "") + " peak MB |\n"
    head += "|---" * (5 + clip) + "|\n"
    body = "".join(
        f"| {r['row']}{_subset(r, meta)} | {r['nfe_per_image']:g} | {r['sec_per_image']:.3f} s "
        f"| {r['ratio_to_cfg']:.2f} |" + (f" {r.get('clip_score', float('nan')):.2f} |" if clip else "")
        + f" {r['peak_mem_mb']:.0f} |\n" for r in rows)
    note = (f"\n{meta['model']} ({meta['dtype']}), {meta['n']} images per row (same prompts and seeds), "
            f"{meta['sampler']}, batch {meta['batch_size']}, on {meta['device']}; time ratio is to "
            f"`{meta['reference_row']}`.\n")
    return head + body + note


def _subset(row: dict[str, Any], meta: dict[str, Any]) -> str:
    return "" if row["n_images"] == meta["n"] else f" [n={row['n_images']}]"
