"""`noiserefine bench` (docs/world.md section 6): every method in ONE process, on the same prompts
and seeds, with time per image, model evaluations, memory, adherence and FD under two judges.

A row is written `method[@opt+opt...]`, options `cfgW`, `pagS`, `autoA` (autoguidance with the
backbone's guide model), `startF`/`stopF` (guidance interval), `stepsN`, `nN` (fewer images for an
expensive row: the first N of the same prompts and seeds), `strengthS`, and a sampler `ddim`,
`euler` or `dpmpp` (DPM-Solver++; default: the bench's `scheduler`), each on the model's own timestep
spacing (`sampling.make_scheduler`). Examples: `gaussian`, `gaussian@cfg5`, `gaussian@cfg2+pag3`,
`gaussian@auto2`, `refined@steps5`, `refined@euler`, `gaussian@cfg2+dpmpp`, `noise-diffusion@n200`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from noiserefine.backbones.base import Backbone
from noiserefine.backbones.loading import load_backbone
from noiserefine.errors import NoiseRefineError
from noiserefine.evaluation.real_suite import SAVED, RealEvaluation, RealRowScore, metric_columns, save_row
from noiserefine.evaluation.scorers import scorer_for
from noiserefine.evaluation.timing import (DEFAULT_ROUNDS, DEFAULT_THREADS, MachineLoad, RowClock, check_timing,
                                           chunk_bounds, load_warning, schedule, torch_threads)
from noiserefine.generation import NoiseMethod, SamplingOptions, generate_latents, progress_notes
from noiserefine.guidance import UNGUIDED, Guidance, Teacher, check_guide
from noiserefine.io import OutputFolder, write_json
from noiserefine.methods import registry
from noiserefine.methods.refine import NoiseRefiner
from noiserefine.methods.registry import MethodContext
from noiserefine.sampling import SCHEDULERS, as_saved, make_scheduler
from noiserefine.world.shapes16 import ALL_PROMPTS

@dataclass(frozen=True)
class Split:
    """A fixed draw of bench prompts and noise seeds. Tune on "dev"; report on "test", which no
    choice (recipe, scale, snapshot, threshold) may touch. Both seed ranges are disjoint from each
    other and from training-target seeds (0 .. ~10^5)."""

    prompt_seed: int
    noise_seed_offset: int


SPLITS = {"dev": Split(prompt_seed=20241121, noise_seed_offset=1_000_000),
          "test": Split(prompt_seed=20261127, noise_seed_offset=2_000_000)}
MAX_BENCH_IMAGES = 1_000_000  # keeps the dev seed range below the test one
# The full bench takes 14.5-17 minutes on 2 shared CPU cores: rows not needed at 1,000 images
# run on the first 300 (200 for the per-sample search methods) of the same prompts and seeds.
REAL_MODEL_ROWS = "gaussian,gaussian@cfg7.5,gaussian@pag3,gaussian@cfg7.5+pag3"  # + refined with --refiner
DEFAULT_ROWS = ("gaussian,gaussian@cfg2,refined,refined@steps5,gaussian@steps5,gaussian@cfg1.25+n300,"
                "gaussian@cfg3+n300,gaussian@cfg2.5+pag1.5+start0.6,gaussian@pag3+n300,gaussian@auto3,"
                "golden,golden@cfg2+n300,noise-diffusion@n200,best-of-n@n200")
SCHEDULER_TOKENS = {name.replace("+", "p"): name for name in SCHEDULERS}
"""Row tokens of the samplers (`+` joins row options, so DPM-Solver++ is `dpmpp`)."""


@dataclass(frozen=True)
class RowSpec:
    """One bench row: a noise method and its options, sampled with `guidance` in `steps` steps of
    `scheduler` (None: the bench's), on the first `n` images (None: all)."""

    method: str
    guidance: Guidance = UNGUIDED
    steps: int = 20
    n: int | None = None
    options: tuple[tuple[str, float], ...] = ()
    scheduler: str | None = None

    @property
    def label(self) -> str:
        labels = {o.name: o.label or o.name for o in registry.entry(self.method).options}
        extra = (f", {self.steps} steps" if self.steps != 20 else "") + "".join(
            f", {labels[k]}={v:g}" for k, v in self.options) + (
            f", {self.scheduler}" if self.scheduler not in (None, "ddim") else "")
        return f"{self.method} ({self.guidance.name}{extra})"


def parse_row(text: str) -> RowSpec:
    """A row `method[@opt+opt...]`: guidance tokens (`Guidance`'s: cfgW, pagS, autoA, startF, stopF),
    `stepsN`, `nN`, a sampler (`SCHEDULER_TOKENS`: ddim, euler, dpmpp) and the method's own
    (`refined@strength0.5`, `refined@w3`)."""
    method, _, opts = text.strip().partition("@")
    entry = registry.entry(method)
    tokens = {o.token: o for o in entry.options if o.token}
    guidance, steps, n, options, scheduler = {}, 20, None, {}, None
    for opt in filter(None, opts.split("+")):
        m = re.fullmatch(r"([a-z]+)([0-9.]+)", opt)
        parsed = Guidance.parse_token(opt) if m else None
        if opt in SCHEDULER_TOKENS and scheduler is None:
            scheduler = SCHEDULER_TOKENS[opt]
        elif parsed:
            guidance[parsed[0]] = parsed[1]
        elif m and m.group(1) in ("steps", "n") and m.group(2).isdigit():
            steps, n = (int(m.group(2)), n) if m.group(1) == "steps" else (steps, int(m.group(2)))
        elif m and m.group(1) in tokens:
            options[tokens[m.group(1)].name] = tokens[m.group(1)].type(float(m.group(2)))
        else:
            raise NoiseRefineError(f"bad bench row option {opt!r} in {text!r}")
    # a bad scale or interval fails while parsing, before any row runs
    return RowSpec(method, Guidance(**guidance), steps, n, tuple(options.items()), scheduler)


@dataclass
class BenchSetup:
    prompts: list[str]
    seeds: list[int]
    batch_size: int


RESULTS = ("bench.md", "bench.json", *SAVED)
"""What `run_bench` writes (`OutputFolder` results; a real-model bench also saves its images and grids)."""


def check_bench_size(n: int, batch_size: int = 1) -> None:
    """Refuse fewer than one image per row or a batch size below 1."""
    if n < 1:
        raise NoiseRefineError(f"n (images per row) must be >= 1, got {n}")
    if batch_size < 1:
        raise NoiseRefineError(f"batch size must be >= 1, got {batch_size}")


def bench_setup(n: int, batch_size: int, prompt_pool: Sequence[str] = ALL_PROMPTS, split: str = "dev") -> BenchSetup:
    """n prompts drawn uniformly from `prompt_pool` with the split's fixed seed, and the split's n
    fixed noise seeds (the first n of the same draw for every n)."""
    check_bench_size(n, batch_size)
    if split not in SPLITS:
        raise NoiseRefineError(f"unknown bench split {split!r}; choose from {', '.join(SPLITS)}")
    if n > MAX_BENCH_IMAGES:
        raise NoiseRefineError(f"the bench takes at most {MAX_BENCH_IMAGES} images per row, got {n}")
    if not prompt_pool:
        raise NoiseRefineError("the bench needs at least one prompt")
    rng = np.random.default_rng(SPLITS[split].prompt_seed)
    prompts = [prompt_pool[i] for i in rng.integers(0, len(prompt_pool), size=n)]
    return BenchSetup(prompts, [SPLITS[split].noise_seed_offset + i for i in range(n)], batch_size)


Score = Callable[[torch.Tensor, list[str]], dict[str, float]]


@dataclass
class RowRun:
    """One row in the interleaved rounds: its method, its images split into chunks (one per
    round), its clock and the images sampled so far."""

    backbone: Backbone
    spec: RowSpec
    method: NoiseMethod
    prompts: list[str]
    seeds: list[int]
    options: SamplingOptions
    chunks: list[tuple[int, int]]
    clock: RowClock = field(default_factory=RowClock)
    images: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def start(cls, backbone: Backbone, spec: RowSpec, method: NoiseMethod, setup: BenchSetup,
              rounds: int) -> "RowRun":
        """The row's first n images (all when its spec names none) in `rounds` chunks."""
        n = _row_size(spec, setup)
        options = SamplingOptions(spec.guidance, spec.steps, batch_size=setup.batch_size)
        if spec.scheduler is not None:  # None: SamplingOptions' default (run_bench fills in the bench's)
            options = replace(options, scheduler=spec.scheduler)
        return cls(backbone, spec, method, setup.prompts[:n], setup.seeds[:n], options,
                   chunk_bounds(n, setup.batch_size, rounds))

    def warm_up(self) -> None:
        """Two steps on the first images touch every code path (untimed; a search method's
        statistics count these images too, as they always have)."""
        warm = min(self.options.batch_size, len(self.prompts), 32)
        generate_latents(self.backbone, self.prompts[:warm], self.seeds[:warm], self.method,
                         replace(self.options, steps=min(self.spec.steps, 2)))

    def run_chunk(self, k: int) -> int:
        """Sample, decode (in batches of the batch size) and time chunk k (as saved: 8-bit); returns
        its number of images."""
        lo, hi = self.chunks[k]
        with self.clock.measure():
            latents = generate_latents(self.backbone, self.prompts[lo:hi], self.seeds[lo:hi], self.method, self.options)
            for part in latents.split(self.options.batch_size):
                self.images.append(as_saved(self.backbone.decode(part)))
        return hi - lo

    def finish(self, score: Score) -> dict[str, Any]:
        """The row's record: cost per image (wall and process CPU time summed over its chunks,
        peak memory of any chunk) and the scores of all its images at once."""
        spec, n, stats = self.spec, len(self.prompts), getattr(self.method, "stats", {})
        nfe = spec.guidance.nfe(spec.steps) + self.method.extra_nfe
        return {"row": spec.label, "method": spec.method, **spec.guidance.to_record(), "steps": spec.steps,
                "scheduler": spec.scheduler,
                **dict(spec.options), "n_images": n, "nfe_per_image": round(float(stats.get("nfe_per_image", nfe)), 2),
                "sec_per_image": self.clock.wall / n, "cpu_sec_per_image": self.clock.cpu / n,
                "rounds": self.clock.chunks, "peak_mem_mb": round(self.clock.peak_mb, 1),
                **score(torch.cat(self.images), self.prompts), **stats}


def run_rows(backbone: Backbone, specs: Sequence[RowSpec], build: Callable[[RowSpec, list[dict]], NoiseMethod],
             setup: BenchSetup, score: Score, rounds: int = DEFAULT_ROUNDS, progress: bool = False,
             on_row: Callable[[RowRun], None] | None = None) -> list[dict]:
    """Time the rows in interleaved rounds and score them; one record per spec, in order.

    Every row is warmed up first, then round k samples chunk k of every row (`schedule`), so load
    that hits the machine at some moment hits every row alike. `build(spec, done)` makes a row's
    method from the records of the rows before it that are done: a row that reads them (best-of-n
    takes Noise Diffusion's scorer budget) runs in a later set of rounds (`_waves`). The progress
    bar counts images. `on_row(run)` sees each finished row's images (the real-model bench saves them).
    """
    done: dict[int, dict] = {}
    with tqdm(total=sum(_row_size(s, setup) for s in specs), unit="img", desc="bench", disable=not progress) as bar:
        for wave in _waves(specs):
            runs = [RowRun.start(backbone, specs[i], build(specs[i], [done[j] for j in sorted(done) if j < i]),
                                 setup, rounds) for i in wave]
            for run in runs:
                bar.set_postfix_str(f"warm-up {run.spec.label}")
                run.warm_up()
            chunks = [len(run.chunks) for run in runs]
            for k, r in schedule(chunks):
                label = f"round {k + 1}/{max(chunks)} {runs[r].spec.label}"
                bar.set_postfix_str(label)
                with progress_notes(bar if progress else None, label + ": "):  # steps, search rounds
                    bar.update(runs[r].run_chunk(k))
            bar.set_postfix_str("scoring")
            for run in runs if on_row else ():
                on_row(run)
            done |= {i: run.finish(score) for i, run in zip(wave, runs)}
    return [done[i] for i in range(len(specs))]


def _waves(specs: Sequence[RowSpec]) -> list[list[int]]:
    """Row indices in sets of interleaved rounds: a best-of-n row without its own budget takes its
    scorer budget from the last Noise Diffusion row before it (`_method_opts`), so it runs in a
    set after that row's."""
    level: list[int] = []
    for i, spec in enumerate(specs):
        waits = spec.method == "best-of-n" and "budget" not in dict(spec.options)
        nd = [j for j in range(i) if specs[j].method == "noise-diffusion"] if waits else []
        level.append(level[nd[-1]] + 1 if nd else 0)
    return [[i for i, w in enumerate(level) if w == k] for k in range(max(level, default=-1) + 1)]


def _row_size(spec: RowSpec, setup: BenchSetup) -> int:
    return min(spec.n or len(setup.prompts), len(setup.prompts))


def run_bench(out: Path, n: int = 1000, batch_size: int = 250, rows: str = "default",
              refiner: Path | None = None, model: str | None = None, progress: bool = True,
              prompts: Sequence[str] | None = None, evaluation: RealEvaluation = RealEvaluation(), dtype: str | None = None,
              force: bool = False, guide: str | None = None, scorer: str | None = None,
              overwrite: bool = False, split: str = "dev", threads: int = DEFAULT_THREADS,
              rounds: int = DEFAULT_ROUNDS, npnet: Path | None = None, scheduler: str = "ddim") -> Path:
    """Run the benchmark; writes `out/bench.md` and `out/bench.json` and returns the .md path (a
    folder holding a bench is refused unless `overwrite`; the folder is made when the rows are done).

    On the embedded shapes16 model rows are scored by the two judges (adherence, FD). On a real
    model (`model` = a pipeline folder or hub id) rows carry time, model evaluations and memory,
    plus what `evaluation` asks for (`noiserefine.evaluation.real_suite`: the mean of each scorer
    whose local model it names, FD to a reference folder), and each row's images and a labelled
    grid are saved into `out` as the row finishes (the folder is then made before the rows run);
    the search rows' scorer comes from the same models; prompts come from `prompts`
    (default: the shapes16 prompts, which any text-to-image model can read), drawn with `split`'s
    seeds ("dev" to tune on, "test" to report). A refined row's teacher row is added to the run
    when missing (for a scale-conditioned refiner, the teacher at the row's scale `wW`).

    Rows are sampled with `scheduler` (a row may name its own: `refined@euler`; paper Fig. 28), on
    the model's own timestep spacing, with `threads` torch threads and timed in `rounds` interleaved rounds
    (`noiserefine.evaluation.timing`); bench.json records the machine's load, and the table warns
    when other work competed for the CPUs.
    """
    folder = OutputFolder(Path(out), RESULTS, overwrite=overwrite).check()
    check_bench_size(n, batch_size)
    check_timing(threads, rounds)
    backbone = load_backbone(model, guide=guide, dtype=dtype)
    suite = SUITES.get(getattr(backbone, "world", None), REAL_MODEL_SUITE)
    specs = [parse_row(r) for r in (suite.rows if rows == "default" else rows).split(",")]
    if rows == "default" and refiner is not None and not any(s.method == "refined" for s in specs):
        specs.append(parse_row("refined"))
    specs = [replace(s, scheduler=s.scheduler or scheduler) for s in specs]
    for spec in specs:
        check_guide(backbone, spec.guidance)
        make_scheduler(spec.scheduler, backbone.scheduler_config)  # an unknown or unfit sampler fails here
    weights = {m: Path(w) for m, w in (("refined", refiner), ("golden", npnet)) if w is not None}
    for method, path in weights.items():
        if not any(s.method == method for s in specs):
            raise NoiseRefineError(f"{path} would be ignored: no row of {rows!r} is a {method!r} row")
    evaluation.check()
    score = suite.score(backbone, evaluation)
    setup = bench_setup(n, batch_size, list(prompts or ALL_PROMPTS), split)
    ctx = MethodContext(backbone, scorer=scorer_for(backbone, scorer, evaluation.models, search=True), weights=weights,
                        force=force)
    teachers = _teacher_rows(ctx, specs) if any(s.method == "refined" for s in specs) else {}
    for k, row in enumerate(dict.fromkeys(teachers.values())):  # a teacher's row must be in the same run
        if not any(_same_guidance(s, row) for s in specs):
            specs.insert(1 + k, row)

    def build(spec: RowSpec, results: list[dict]) -> NoiseMethod:
        options = SamplingOptions(spec.guidance, spec.steps, spec.scheduler, setup.batch_size)
        return registry.build(spec.method, replace(ctx, sampling=options), **_method_opts(spec, results))

    saved = folder.open() if suite.saves_images else None
    on_row = (lambda run: save_row(saved, run.spec.label, torch.cat(run.images), run.prompts, run.seeds)) if saved else None
    load = MachineLoad(threads)
    with torch_threads(threads):
        results = run_rows(backbone, specs, build, setup, score, rounds, progress, on_row)
    load.finish()
    for spec, row in zip(specs, results):
        if spec in teachers:
            teacher = teachers[spec]
            row |= {"teacher_" + k: v for k, v in teacher.guidance.to_record().items()} | {"teacher_row": teacher.label}
    reference = next(iter(teachers.values()), None) or next((s for s in specs if s.method == "gaussian" and s.guidance.cfg != 1
                                 and not s.guidance.uses_pag and not s.guidance.uses_auto
                                 and not s.guidance.limited), specs[0])
    ref_row = next(r for r in results if r["row"] == reference.label)
    for r in results:
        r["ratio_to_cfg"] = r["sec_per_image"] / ref_row["sec_per_image"]
        r["cpu_ratio_to_cfg"] = r["cpu_sec_per_image"] / ref_row["cpu_sec_per_image"]
    spacing = make_scheduler(scheduler, backbone.scheduler_config).config.get("timestep_spacing")
    meta = {"n": n, "split": split, "batch_size": batch_size, "sampler": f"{scheduler} ({spacing})" if spacing else scheduler,
            "reference_row": reference.label,
            "torch_threads": threads, "rounds": rounds, "load": load.to_record(), "device": str(backbone.device),
            "methods": list(dict.fromkeys(s.method for s in specs)),
            "model": model or "shapes16", "backbone": type(backbone).__name__, "dtype": str(backbone.dtype).removeprefix("torch."),
            **getattr(score, "meta", {})}
    out = saved or folder.open()  # opened once: under `overwrite` a second open would delete the saved images
    write_json(out / "bench.json", {"meta": meta, "rows": results})
    (out / "bench.md").write_text(suite.table(results, meta))
    return out / "bench.md"


def _judge_score(backbone: Backbone, evaluation: RealEvaluation) -> Callable[[torch.Tensor, list[str]], dict[str, float]]:
    """Adherence and FD under both judges (the embedded world)."""
    from noiserefine.evaluation.judge import load_judges
    from noiserefine.evaluation.metrics import score_images

    judges = load_judges()
    return lambda images, prompts: score_images(images, prompts, judges)


def _teacher_rows(ctx: MethodContext, specs: list[RowSpec]) -> dict[RowSpec, RowSpec]:
    """The Gaussian row of each refined row's teacher: the refiner's teacher (recorded in its card),
    at the row's teacher scale `wW` for a scale-conditioned refiner. Unguided teachers and
    conditioned refiner rows without a scale get none."""
    refiner = ctx.load("refined", NoiseRefiner.load)  # attached once; every refined row shares it
    teacher = Teacher.from_record(refiner.meta["config"].get("teacher", {}))
    rows = {}
    for spec in specs:
        w = dict(spec.options).get("teacher_scale")
        if spec.method == "refined" and (w is not None or not teacher.conditioned):
            row = replace(parse_row(teacher.row(w if teacher.conditioned else None)), scheduler=spec.scheduler)
            if row.guidance.is_guided:
                rows[spec] = row
    return rows


def _same_guidance(a: RowSpec, b: RowSpec) -> bool:
    return (a.method, a.guidance, a.steps, a.n, a.scheduler) == (b.method, b.guidance, b.steps, b.n, b.scheduler)


def _method_opts(spec: RowSpec, results: list[dict]) -> dict[str, Any]:
    """The row's method options; best-of-n, unless its row names a budget, gets the scorer budget
    Noise Diffusion used earlier in the same run (the equal-budget comparison of its paper)."""
    opts = dict(spec.options)
    nd = [r for r in results if r["method"] == "noise-diffusion" and "scorer_calls_per_image" in r]
    if spec.method == "best-of-n" and nd and "budget" not in opts:
        opts["budget"] = max(1, round(nd[-1]["scorer_calls_per_image"]))
    return opts


def format_table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    head = ("| row | NFE/img | s/img | CPU s/img | x CFG-ref time | adherence | held-out adh. | color | shape "
            "| position | FD | held-out FD | peak MB |\n" + "|---" * 13 + "|\n")
    body = "".join(
        f"| {r['row']}{_subset(r, meta)} | {r['nfe_per_image']:g} | {r['sec_per_image'] * 1e3:.2f} ms "
        f"| {r['cpu_sec_per_image'] * 1e3:.2f} ms | {r['ratio_to_cfg']:.2f} | {r['adherence']:.3f} "
        f"| {r.get('heldout_adherence', float('nan')):.3f} | {r['acc_color']:.3f} | {r['acc_shape']:.3f} "
        f"| {r['acc_position']:.3f} | {r['fd']:.1f} | {r.get('heldout_fd', float('nan')):.1f} | {r['peak_mem_mb']:.0f} |\n"
        for r in rows)
    note = (f"\n{meta['n']} images per row (same prompts and seeds), {meta['sampler']}, batch {meta['batch_size']}, "
            f"{meta['torch_threads']} torch thread(s) on {meta['device']}, {_timing_note(meta)}; time ratio is to "
            f"`{meta['reference_row']}`.\n")
    return head + body + note + load_warning(meta["load"])


def format_real_table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The table for a real model: cost columns, and the scores and FD computed (`real_suite.metric_columns`)."""
    metrics = metric_columns(rows, meta)
    head = "| row | NFE/img | s/img | CPU s/img | x CFG-ref time |" + "".join(f" {h} |" for _, h, _ in metrics) + " peak MB |\n"
    head += "|---" * (6 + len(metrics)) + "|\n"
    body = "".join(
        f"| {r['row']}{_subset(r, meta)} | {r['nfe_per_image']:g} | {r['sec_per_image']:.3f} s "
        f"| {r['cpu_sec_per_image']:.3f} s | {r['ratio_to_cfg']:.2f} |"
        + "".join(" " + fmt.format(r.get(key, float("nan"))) + " |" for key, _, fmt in metrics)
        + f" {r['peak_mem_mb']:.0f} |\n" for r in rows)
    note = (f"\n{meta['model']} ({meta['dtype']}), {meta['n']} images per row (same prompts and seeds), "
            f"{meta['sampler']}, batch {meta['batch_size']}, {meta['torch_threads']} torch thread(s) on {meta['device']}, "
            f"{_timing_note(meta)}; time ratio is to `{meta['reference_row']}`.\n")
    return head + body + note + load_warning(meta["load"])


def _timing_note(meta: dict[str, Any]) -> str:
    return (f"times summed over {meta['rounds']} interleaved rounds (CPU: process CPU time; 1-minute load average "
            f"{meta['load']['loadavg_before'][0]:g} before, {meta['load']['loadavg_after'][0]:g} after, "
            f"{meta['load']['cpus']} CPUs)")


@dataclass(frozen=True)
class Suite:
    """How a world is benchmarked: its default rows, its row scores, its table and whether each
    row's images are saved (with a grid) into the bench folder."""

    rows: str
    score: Callable[[Backbone, RealEvaluation], Callable[[torch.Tensor, list[str]], dict[str, float]]]
    table: Callable[[list[dict[str, Any]], dict[str, Any]], str]
    saves_images: bool = False


SUITES = {"shapes16": Suite(DEFAULT_ROWS, _judge_score, format_table)}
"""Suites by the backbone's `world`; any other model is benchmarked as a real model."""
REAL_MODEL_SUITE = Suite(REAL_MODEL_ROWS, RealRowScore, format_real_table, saves_images=True)


def _subset(row: dict[str, Any], meta: dict[str, Any]) -> str:
    return "" if row["n_images"] == meta["n"] else f" [n={row['n_images']}]"
