"""The `noiserefine` command line: thin commands over library functions.

Every command prints a one-line `error: ...` and exits with status 2 on bad input.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Callable

import click

from noiserefine.errors import NoiseRefineError

PATH = click.Path(path_type=Path)


def _friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A command whose user errors (NoiseRefineError, a NaN or infinite number given to any option)
    end as one `error: ...` line and exit status 2."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            _check_finite(kwargs)
            return fn(*args, **kwargs)
        except NoiseRefineError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)
    return wrapper


def _check_finite(params: dict[str, Any]) -> None:
    """Refuse nan and inf in number options (click's float type accepts them)."""
    for name, value in params.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise NoiseRefineError(f"--{name.replace('_', '-')} must be a finite number, got {value}")


def _overwrite_option(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--overwrite: replace the results already in --out (deleted only once the inputs are valid).
    Without it such a folder is refused, or resumed where the command can (`io.OutputFolder`)."""
    return click.option("--overwrite", is_flag=True, help=f"replace {what} already in --out")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("-v", "--verbose", is_flag=True, help="log debug messages too")
@click.option("-q", "--quiet", is_flag=True, help="log warnings and errors only")
def main(verbose: bool, quiet: bool) -> None:
    """Guided diffusion quality at unguided cost: NoiseRefine, Golden Noise and Noise Diffusion.

    Example: noiserefine sample --prompt-file prompts.txt --seeds 0-7 --method refined --out out/

    Several jobs on few CPU cores: run each with OMP_NUM_THREADS=1 (OpenMP threads of
    concurrent processes otherwise thrash).
    """
    if verbose and quiet:
        raise click.UsageError("--verbose and --quiet exclude each other")
    _configure_logging(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)


class _LogHandler(logging.StreamHandler):
    """The CLI's handler of the `noiserefine` logger: one `noiserefine: message` line on stderr."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter("noiserefine: %(message)s"))


def _configure_logging(level: int) -> None:
    """The library logs to the `noiserefine` logger (a NullHandler of its own); the CLI shows it."""
    logger = logging.getLogger("noiserefine")
    for handler in [h for h in logger.handlers if isinstance(h, _LogHandler)]:
        logger.removeHandler(handler)
    logger.addHandler(_LogHandler())
    logger.setLevel(level)


def _read_prompts(path: Path, column: str | None = None) -> list[str]:
    from noiserefine.prompt_files import read_prompts

    return read_prompts(path, column)


PROMPT_FILE_HELP = "one prompt per line, or a .csv / .parquet dataset file (see --prompt-column)"
PROMPT_COLUMN_HELP = "the prompt column of a .csv / .parquet --prompt-file (e.g. caption); a file of one column needs none"


def _scorer_model_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--clip-model, --aesthetic-model, --pickscore-model, ...: the scorers' local model paths,
    read off `noiserefine.evaluation.scorers.ScorerModels`."""
    from noiserefine.evaluation.scorers import MODEL_HELP

    for name, help_ in reversed(list(MODEL_HELP.items())):
        fn = click.option("--" + name.replace("_", "-"), name, default=None, help=help_)(fn)
    return fn


def _pop_scorer_models(params: dict[str, Any]):
    """The `ScorerModels` of a command's scorer model options (removed from `params`)."""
    from noiserefine.evaluation.scorers import MODEL_HELP, ScorerModels

    return ScorerModels(**{name: params.pop(name) for name in MODEL_HELP})


def _scorer_help(what: str) -> str:
    from noiserefine.evaluation.scorers import SCORERS

    return f"{what}: {' | '.join(SCORERS)} (default: the model's own; shapes16: the primary judge)"


# -- world ------------------------------------------------------------------------------------
@main.group()
def world() -> None:
    """The embedded shapes16 world."""


@world.command("export")
@click.option("--n", default=100, help="number of real renders")
@click.option("--seed", default=0)
@click.option("--out", type=PATH, required=True, help="output folder (its parent must exist)")
@_overwrite_option("an export")
@_friendly_errors
def world_export(n: int, seed: int, out: Path, overwrite: bool) -> None:
    """Write real shapes16 renders (PNG) and labels.jsonl.  Example: noiserefine world export --n 48 --out real/"""
    from noiserefine.world.export import export_world

    click.echo(export_world(out, n, seed, overwrite=overwrite))


@world.command("prompts")
def world_prompts() -> None:
    """Print the 48 shapes16 prompts (one per line): a ready prompt file."""
    from noiserefine.world import ALL_PROMPTS

    click.echo("\n".join(ALL_PROMPTS))


# -- base model -------------------------------------------------------------------------------
@main.command("train-base")
@click.option("--steps", default=2500)
@click.option("--batch-size", default=32)
@click.option("--seed", default=0)
@click.option("--prompt-dropout", default=0.15, show_default=True,
              help="fraction of training prompts replaced by the empty prompt (what CFG needs)")
@click.option("--snapshot-every", default=0, help="also keep EMA weights every K steps (0 = off)")
@click.option("--noise-schedule", default="cosine", show_default=True, type=click.Choice(["cosine", "sd"]),
              help="cosine (zero terminal SNR) or Stable Diffusion's scaled-linear betas; recorded with the weights")
@click.option("--lr", default=3e-4, show_default=True, help="AdamW learning rate (constant)")
@click.option("--world", "world_variant", default="original", show_default=True,
              type=click.Choice(["original", "shifted"]), help="world variant the training images are rendered in")
@click.option("--init-from", default=None,
              help="start from these base weights (a .safetensors, or 'shipped') instead of a fresh init: a fine-tune")
@click.option("--out", type=PATH, required=True, help="run folder (resumes if it holds a checkpoint)")
@_friendly_errors
def train_base_cmd(steps: int, batch_size: int, seed: int, prompt_dropout: float, snapshot_every: int,
                   noise_schedule: str, lr: float, world_variant: str, init_from: str | None, out: Path) -> None:
    """Train the embedded shapes16 base model (resumable).  Example: noiserefine train-base --out runs/base;
    fine-tune on the shifted world: noiserefine train-base --init-from shipped --world shifted --out runs/ft"""
    from noiserefine.io import OutputFolder
    from noiserefine.train_base import BaseTrainConfig, train_base

    OutputFolder(out, ()).check()  # not a file, parent exists; the run itself resumes or refuses
    click.echo(train_base(out, BaseTrainConfig(steps=steps, batch_size=batch_size, seed=seed, lr=lr,
                                               prompt_dropout=prompt_dropout, snapshot_every=snapshot_every,
                                               noise_schedule=noise_schedule, world=world_variant,
                                               init_from=init_from)))


# -- sampling ---------------------------------------------------------------------------------
def _preset_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--preset (a paper recipe: sd21, sdxl, sit-xl-2) and --dtype; typed flags beat the preset."""
    fn = click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
                      help="model dtype (default: fp32, or the preset's)")(fn)
    fn = click.option("--preset", default=None, help="paper recipe: sd21 | sdxl | sit-xl-2")(fn)
    return click.pass_context(fn)


def _with_preset(ctx: click.Context, command: str) -> dict[str, Any]:
    from noiserefine.presets import apply_preset, explicit_options

    params = apply_preset(ctx.params.get("preset"), command, ctx.params, explicit_options(ctx))
    params.pop("preset")
    return params


def _prompts_for(params: dict[str, Any], preset: str | None) -> list[str]:
    """The prompts of --prompt-file / --prompt-column (removed from `params`), else the preset's classes."""
    path, column = params.pop("prompt_file"), params.pop("prompt_column")
    if path is not None:
        return _read_prompts(path, column)
    from noiserefine.presets import get_preset

    if preset and get_preset(preset).class_prompts:
        return list(get_preset(preset).class_prompts)
    raise NoiseRefineError("--prompt-file is required (one prompt per line)")


def _guidance_options(teacher: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The guidance flags (--cfg, --pag, --auto, --guidance-start, --guidance-stop), read off
    `Guidance`'s fields, plus --guide. A teacher's flags (`targets`) take a list such as 2,3,4 in
    at most one of them: a guidance-scale-conditioned teacher (paper A.4)."""
    from noiserefine.guidance import Guidance

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        for f in reversed(Guidance.options()):
            meta = f.metadata
            help_ = meta["help"] + ("; a list 2,3,4 varies it across targets" if teacher else "")
            fn = click.option(meta["flag"], meta["record"], type=str if teacher else float, default=f.default,
                              help=help_)(fn)
        return click.option("--guide", default=None,
                            help="guide model of --auto (default: the shipped one of shapes16)")(fn)
    return decorate


def _pop_guidance(params: dict[str, Any]):
    """The `Guidance` of a command's guidance flags (removed from `params`)."""
    from noiserefine.guidance import Guidance

    return Guidance.from_record({f.metadata["record"]: params.pop(f.metadata["record"]) for f in Guidance.options()})


def _pop_teacher(params: dict[str, Any]):
    """The `Teacher` of `targets`' guidance flags, --steps and --scheduler (removed from `params`)."""
    from noiserefine.guidance import Guidance, Teacher

    values = {f.name: _floats(str(params.pop(f.metadata["record"]))) for f in Guidance.options()}
    varied = [name for name, v in values.items() if len(v) > 1]
    if len(varied) > 1:
        raise NoiseRefineError(f"a teacher varies at most one guidance scale, got lists for {', '.join(varied)}")
    guidance = Guidance(**{name: v[0] for name, v in values.items()})
    field = varied[0] if varied else "cfg"
    return Teacher(guidance, params.pop("steps"), params.pop("scheduler"), field, tuple(values[field]) if varied else ())


def _method_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--method, its weights and scorer, every method's own options (read off the method registry),
    the guidance flags and the sampler's."""
    from noiserefine.evaluation.scorers import SCORERS
    from noiserefine.methods.registry import METHODS, all_options

    options = [
        click.option("--method", default="gaussian", type=click.Choice(list(METHODS)), help="noise method"),
        click.option("--refiner", type=PATH, default=None,
                     help="weights of --method refined (a refiner) or golden (an NPNet); default: the shipped one"),
        click.option("--force", is_flag=True, help="load weights trained on another base model"),
        click.option("--scorer", type=click.Choice(SCORERS), default=None,
                     help="scorer of the search methods (default: the model's own; shapes16: the primary judge)"),
        _scorer_model_options,
        *[click.option(o.flag, o.name, type=o.type, default=None,
                       help=f"{o.help} [{', '.join(m.name for m in METHODS.values() if o in m.options)}; "
                            f"default {o.default}]") for o in all_options().values()],
        _guidance_options(),
        click.option("--steps", default=20, help="sampler steps"),
        click.option("--scheduler", default="ddim", help="ddim | euler | dpm++"),
        click.option("--model", default=None, help="base model: shapes16 (default), weights file or pipeline folder"),
        click.option("--batch-size", default=64),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def _pop_method_options(params: dict[str, Any]) -> dict[str, Any]:
    """The options the user gave for --method (removed from `params`); an option of another method
    is an error, not silently ignored."""
    from noiserefine.methods.registry import METHODS, all_options

    given = {name: params.pop(name) for name in all_options() if params.get(name) is not None}
    for name in all_options():
        params.pop(name, None)
    entry = METHODS[params["method"]]
    foreign = sorted(set(given) - {o.name for o in entry.options})
    if foreign:
        flags = ", ".join(all_options()[name].flag for name in foreign)
        raise NoiseRefineError(f"{flags} do(es) not apply to --method {entry.name}")
    return given


@main.command()
@click.option("--prompt-file", type=PATH, default=None, help=PROMPT_FILE_HELP)
@click.option("--prompt-column", default=None, help=PROMPT_COLUMN_HELP)
@click.option("--seeds", required=True, help="seed range A-B (inclusive) or list A,B,C")
@_method_options
@click.option("--out", type=PATH, required=True, help="output folder (its parent must exist); a folder "
              "of the same settings resumes, one of other settings is refused")
@_overwrite_option("the samples")
@_preset_options
@_friendly_errors
def sample(ctx: click.Context, **_: Any) -> None:
    """One image per prompt and seed: PNGs + manifest.jsonl.

    Example: noiserefine sample --prompt-file p.txt --seeds 0-7 --method refined --out samples/
    """
    from noiserefine.api import sample_to_folder
    from noiserefine.generation import SamplingOptions
    from noiserefine.sampling import seeds_from_range

    params = _with_preset(ctx, "sample")
    prompts = _prompts_for(params, ctx.params.get("preset"))
    seeds, out = seeds_from_range(params.pop("seeds")), params.pop("out")
    method_options = _pop_method_options(params)
    params["scorer_models"] = _pop_scorer_models(params)
    sampling = SamplingOptions(_pop_guidance(params), params.pop("steps"), params.pop("scheduler"),
                               params.pop("batch_size"))
    click.echo(sample_to_folder(prompts, seeds, out, method_options=method_options, sampling=sampling, **params))


@main.command("eval")
@click.argument("folder", type=PATH)
@_friendly_errors
def eval_cmd(folder: Path) -> None:
    """Score a folder written by `sample` (adherence, per-attribute accuracy, FD; both judges)."""
    from noiserefine.evaluation.folder import evaluate_folder

    click.echo(json.dumps(evaluate_folder(folder), indent=2))


# -- NoiseRefine ------------------------------------------------------------------------------
@main.command()
@click.option("--prompt-file", type=PATH, default=None, help=PROMPT_FILE_HELP)
@click.option("--prompt-column", default=None, help=PROMPT_COLUMN_HELP)
@click.option("--seeds", default=None, help="one target per seed, prompts taken in turn: range A-B (inclusive) "
              "or list A,B,C (default: the --preset's)")
@_guidance_options(teacher=True)
@click.option("--steps", default=20, help="teacher sampler steps N'")
@click.option("--scheduler", default="ddim")
@click.option("--shard-size", default=256)
@click.option("--score", default=None, help=_scorer_help("target score for filtering"))
@_scorer_model_options
@click.option("--model", default=None)
@click.option("--batch-size", default=64)
@click.option("--out", type=PATH, required=True, help="target folder (a killed run resumes here)")
@_overwrite_option("the targets instead of resuming them")
@click.option("--dry-run", is_flag=True, help="print the plan (targets, model evaluations, disk, estimated "
              "hours) and make nothing")
@_preset_options
@_friendly_errors
def targets(ctx: click.Context, **_: Any) -> None:
    """Generate guided targets (x_T, prompt, x_0^Guide) in resumable safetensors shards. The
    teacher is any guidance (--cfg, --pag, --auto, an interval); a list in one flag (--cfg
    1.5,2,3,4) makes targets for a scale-conditioned refiner. Under `accelerate launch`,
    processes write disjoint shards of one folder.

    Example: noiserefine targets --prompt-file p.txt --seeds 0-2047 --auto 3 --out runs/targets
    """
    from noiserefine.api import make_targets
    from noiserefine.plan import plan_targets
    from noiserefine.sampling import seeds_from_range

    params = _with_preset(ctx, "targets")
    prompts = _prompts_for(params, ctx.params.get("preset"))
    if params["seeds"] is None:
        raise NoiseRefineError("--seeds is required (or a --preset that sets them)")
    seeds, out, teacher = seeds_from_range(params.pop("seeds")), params.pop("out"), _pop_teacher(params)
    scorer_models = _pop_scorer_models(params)
    if params.pop("dry_run"):
        params.pop("overwrite")  # a plan writes nothing
        click.echo(plan_targets(prompts, seeds, teacher, **params).format(), nl=False)
    else:
        click.echo(make_targets(prompts, seeds, teacher, out, scorer_models=scorer_models, **params))


def _trackers() -> list[str]:
    from noiserefine.train_monitor import TRACKERS

    return list(TRACKERS)


def _validation_prompts(text: str | None) -> tuple[str, ...]:
    """--validation-prompts: `p1,p2`, or `@FILE` with one prompt per line (prompts with commas)."""
    if text is None:
        return ()
    prompts = _read_prompts(Path(text[1:])) if text.startswith("@") else [p.strip() for p in text.split(",")]
    if not all(prompts):
        raise NoiseRefineError(f"--validation-prompts has an empty prompt: {text!r}")
    return tuple(prompts)


def _train_default(name: str) -> Any:
    """`TrainConfig`'s default of field `name` (the CLI never re-types a training default)."""
    from noiserefine.train import TrainConfig

    return TrainConfig.__dataclass_fields__[name].default


@main.command()
@click.option("--targets", "targets_dir", type=PATH, required=True, multiple=True,
              help="target folder (repeat to train on several made by the same teacher)")
@click.option("--steps", default=_train_default("steps"), help="optimizer steps")
@click.option("--batch-size", default=_train_default("batch_size"), help="global batch (split across processes)")
@click.option("--lr", default=_train_default("lr"))
@click.option("--lr-schedule", default=_train_default("lr_schedule"), type=click.Choice(["constant", "cosine"]),
              help="cosine decays the learning rate to 0 over --steps")
@click.option("--loss", default=_train_default("loss"), type=click.Choice(["msd", "full", "noise"]))
@click.option("--msd-steps", default=_train_default("msd_steps"), help="unguided sampler steps N inside the loss")
@click.option("--scheduler", default=_train_default("scheduler"), help="sampler inside the loss: ddim | euler | dpm++")
@click.option("--rank", default=_train_default("rank"), help="LoRA rank")
@click.option("--keep-fraction", default=_train_default("keep_fraction"),
              help="train on the best fraction of targets by score")
@click.option("--scale-conditioning", is_flag=True, help="condition the refiner on the teacher's scale")
@click.option("--init-from", default=None,
              help="start from this refiner (folder, Hub id or old .safetensors; same rank and layers)")
@click.option("--gradient-checkpointing", is_flag=True, help="recompute denoiser activations in backward")
@click.option("--mixed-precision", type=click.Choice(["no", "fp16", "bf16"]), default=None,
              help="autocast (default: accelerate launch's, else the --dtype's); refiner weights stay fp32")
@click.option("--seed", default=_train_default("seed"))
@click.option("--model", default=None)
@click.option("--out", type=PATH, required=True, help="run folder (a killed run resumes here)")
@_overwrite_option("the run (checkpoint and refiner) instead of resuming it")
@click.option("--dry-run", is_flag=True, help="print the plan (samples, model evaluations, disk, estimated "
              "hours) and train nothing")
@click.option("--report-to", type=click.Choice(_trackers()), default=None,
              help="experiment tracker for loss and learning rate per step (under OUT/logs; needs its package)")
@click.option("--validation-prompts", default=None,
              help="comma list p1,p2 (or @FILE, one prompt per line): a grid of Gaussian vs refined unguided "
                   "samples every --validation-every steps, in OUT/validation")
@click.option("--validation-every", default=0, help="steps between validation grids")
@_preset_options
@_friendly_errors
def train(ctx: click.Context, **_: Any) -> None:
    """Train a NoiseRefine refiner with MSD (resumable; multi-GPU via `accelerate launch`).

    Example: noiserefine train --targets runs/targets --steps 400 --out runs/refiner
    """
    from noiserefine.backbones.loading import load_backbone
    from noiserefine.plan import plan_train
    from noiserefine.train import TrainConfig, train_refiner
    from noiserefine.train_monitor import Monitoring

    params = _with_preset(ctx, "train")
    targets_dirs, out, overwrite = list(params.pop("targets_dir")), params.pop("out"), params.pop("overwrite")
    model, dtype, dry_run = params.pop("model"), params.pop("dtype"), params.pop("dry_run")
    monitoring = Monitoring(params.pop("report_to"), _validation_prompts(params.pop("validation_prompts")),
                            params.pop("validation_every"))
    cfg = TrainConfig(**params)  # bad settings fail before the model loads
    if dry_run:
        click.echo(plan_train(cfg, model=model, dtype=dtype).format(), nl=False)
    else:
        click.echo(train_refiner(load_backbone(model, dtype=dtype), targets_dirs, out, cfg, overwrite=overwrite,
                                 monitoring=monitoring))


# -- Golden Noise / NPNet ---------------------------------------------------------------------
def _dataclass_options(where: str, helps: dict[str, str]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """One option per field named in `helps` of the dataclass `where` ("module:Class"), its default
    read off the dataclass (the CLI never re-types a default)."""
    import importlib

    module, name = where.split(":")
    fields = getattr(importlib.import_module(module), name).__dataclass_fields__

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        for field, help_ in reversed(list(helps.items())):
            default = fields[field].default
            fn = click.option("--" + field.replace("_", "-"), default=default, type=type(default), help=help_)(fn)
        return fn
    return decorate


@main.group()
def golden() -> None:
    """Golden Noise: NPNet's noise pairs (re-denoise sampling) and its training.

    \b
    Example: noiserefine golden pairs --prompt-file p.txt --seeds 0-2399 --out runs/pairs
             noiserefine golden train --pairs runs/pairs --out runs/npnet
    """


@golden.command("pairs")
@click.option("--prompt-file", type=PATH, required=True, help=PROMPT_FILE_HELP + "; pair i takes prompt i mod P")
@click.option("--prompt-column", default=None, help=PROMPT_COLUMN_HELP)
@click.option("--seeds", required=True, help="one pair per seed: range A-B (inclusive) or list A,B,C")
@_dataclass_options("noiserefine.npnet_pairs:RedenoiseSpec", {
    "high_cfg": "CFG scale w_l of the DDIM step from x_T",
    "low_cfg": "CFG scale w_w of the inversion back to T (< --high-cfg)",
    "grid_steps": "trailing DDIM grid whose first step is taken and inverted",
    "filter_cfg": "CFG scale of the two images sampled to score a pair",
    "filter_steps": "sampler steps of those images",
    "shard_size": "pairs per shard file"})
@click.option("--score", default=None, help=_scorer_help("pair filter scorer"))
@_scorer_model_options
@click.option("--model", default=None, help="base model: shapes16 (default), weights file or pipeline folder")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None, help="model dtype")
@click.option("--batch-size", default=64)
@click.option("--out", type=PATH, required=True, help="pair folder (a killed run resumes here)")
@_overwrite_option("the pairs instead of resuming them")
@_friendly_errors
def golden_pairs(prompt_file: Path, prompt_column: str | None, seeds: str, score: str | None, model: str | None,
                 dtype: str | None, batch_size: int, out: Path, overwrite: bool, **options: Any) -> None:
    """Collect NPNet's noise pairs (x_T, x_T') by re-denoise sampling, each scored on the images
    of both noises (resumable; under `accelerate launch`, processes write disjoint shards).

    Example: noiserefine golden pairs --prompt-file p.txt --seeds 0-2399 --out runs/pairs
    """
    import torch
    from accelerate import PartialState

    from noiserefine.backbones.loading import load_backbone
    from noiserefine.evaluation.scorers import scorer_for
    from noiserefine.io import OutputFolder
    from noiserefine.npnet_pairs import RESULTS, RedenoiseSpec, collect_pairs
    from noiserefine.sampling import seeds_from_range

    OutputFolder(out, RESULTS, overwrite=overwrite, resume=True).check()  # before the model loads
    models = _pop_scorer_models(options)
    prompts, seed_list = _read_prompts(prompt_file, prompt_column), seeds_from_range(seeds)
    backbone = load_backbone(model, dtype=dtype)
    backbone.encode_prompts(prompts)  # an unknown word fails before any work
    score = score or getattr(backbone, "default_scorer", None)
    if score in (None, "none"):
        raise NoiseRefineError("golden pairs keeps the pairs a scorer prefers: choose one with --score")
    spec = RedenoiseSpec(prompts, seed_list, score=score, **options)
    scorer = scorer_for(backbone, score, models)
    state = PartialState(cpu=not torch.cuda.is_available())
    collect_pairs(backbone, spec, out, scorer, batch_size, (state.process_index, state.num_processes),
                  state.wait_for_everyone, overwrite=overwrite, progress=state.is_main_process)
    state.wait_for_everyone()
    click.echo(out)


@golden.command("train")
@click.option("--pairs", type=PATH, required=True, help="pair folder written by `golden pairs`")
@_dataclass_options("noiserefine.train_npnet:NPNetTrainConfig", {
    "steps": "optimizer steps",
    "batch_size": "pairs per step",
    "lr": "peak learning rate (cosine decay to 0)",
    "margin": "keep pairs whose score beats their source's by more than this (s_0 + m < s_0')",
    "val_fraction": "held-out share of the kept pairs (every k-th pair)",
    "width": "NPNet transformer width",
    "depth": "residual-branch transformer layers",
    "heads": "attention heads",
    "patch": "residual-branch patch size",
    "seed": "initialisation and batch-order seed",
    "checkpoint_every": "steps between checkpoints"})
@click.option("--model", default=None, help="base model the pairs were collected with (default: shapes16)")
@click.option("--out", type=PATH, required=True, help="run folder (a killed run resumes here)")
@_overwrite_option("the run (checkpoint and NPNet) instead of resuming it")
@_friendly_errors
def golden_train(pairs: Path, model: str | None, out: Path, overwrite: bool, **config: Any) -> None:
    """Train NPNet on a pair folder with MSE (resumable): writes OUT/npnet.safetensors + .json.

    Example: noiserefine golden train --pairs runs/pairs --out runs/npnet
    """
    from noiserefine.backbones.loading import load_backbone
    from noiserefine.train_npnet import NPNetTrainConfig, train_npnet

    cfg = NPNetTrainConfig(**config)
    click.echo(train_npnet(load_backbone(model), pairs, out, cfg, overwrite=overwrite))


# -- evaluation -------------------------------------------------------------------------------
def _timing_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--threads and --rounds of the bench's clock (`noiserefine.evaluation.timing`)."""
    from noiserefine.evaluation.timing import DEFAULT_ROUNDS, DEFAULT_THREADS

    fn = click.option("--rounds", default=DEFAULT_ROUNDS, help="interleaved timing rounds: round k samples the "
                      "k-th part of every row, so load on a shared machine hits every row alike")(fn)
    return click.option("--threads", default=DEFAULT_THREADS, help="torch threads (more run faster on an idle "
                        "machine, but other load then skews the time ratios)")(fn)


@main.command()
@click.option("--n", default=1000, help="images per row")
@click.option("--batch-size", default=250)
@click.option("--rows", default="default", help="comma list of row names, or 'default'")
@click.option("--refiner", type=PATH, default=None, help="refiner of the refined rows (default: the shipped one)")
@click.option("--npnet", type=PATH, default=None, help="NPNet of the golden rows (default: the shipped one)")
@click.option("--force", is_flag=True, help="use weights trained on another base model")
@click.option("--model", default=None, help="base model: shapes16 (default), weights file, pipeline folder or hub id")
@click.option("--guide", default=None, help="guide model of the autoA rows (default: the shipped one of shapes16)")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None, help="real-model dtype")
@click.option("--prompt-file", type=PATH, default=None, help="prompt pool (default: the 48 shapes16 prompts): "
              + PROMPT_FILE_HELP)
@click.option("--prompt-column", default=None, help=PROMPT_COLUMN_HELP)
@_scorer_model_options
@click.option("--reference", type=PATH, default=None,
              help="folder of reference images: FD of each row to them (real models)")
@click.option("--fd-model", type=PATH, default=None, help="FD features: an Inception-v3 weights file (FID; needs "
              "torch-fidelity) or a local CLIP folder (FD in CLIP space; default: --clip-model); the table names it")
@click.option("--scorer", default=None, help=_scorer_help("scorer of the search-method rows"))
@click.option("--split", type=click.Choice(["dev", "test"]), default="dev",
              help="prompt and seed draw: tune on dev; report on test, which no choice may touch")
@click.option("--scheduler", default="ddim", help="sampler of the rows that name none: ddim | euler | dpm++ "
              "(on the model's own timestep spacing; a row names its own as refined@euler, gaussian@cfg2+dpmpp)")
@click.option("--out", type=PATH, required=True)
@_overwrite_option("a bench")
@_timing_options
@_friendly_errors
def bench(n: int, batch_size: int, rows: str, refiner: Path | None, npnet: Path | None, force: bool, model: str | None,
          guide: str | None, dtype: str | None, prompt_file: Path | None, prompt_column: str | None,
          reference: Path | None, fd_model: Path | None, scorer: str | None, split: str, scheduler: str, out: Path,
          overwrite: bool, threads: int, rounds: int, **models: str | None) -> None:
    """All methods, one process, same prompts and seeds: bench.md + bench.json.

    On shapes16 rows are scored by the judges; on a real model (--model) they carry cost figures,
    the mean of each scorer whose model is given (--clip-model: CLIP score, --pickscore-model,
    --hpsv2-model, --imagereward-model, --aesthetic-model) and, with --reference, FD to a folder of
    images; each row's images and a labelled grid are saved under OUT/images and OUT/grids. A row is `method[@opt+opt...]` with guidance options
    cfgW pagS autoA startF stopF, stepsN, nN (first N images only), a sampler ddim | euler | dpmpp
    and the method's own (refined: strengthS, wW for a scale-conditioned refiner; best-of-n: budgetB).

    Example: noiserefine bench --n 1000 --split test --out runs/bench
    """
    from noiserefine.evaluation.bench import run_bench
    from noiserefine.evaluation.real_suite import RealEvaluation

    prompts = _read_prompts(prompt_file, prompt_column) if prompt_file else None
    evaluation = RealEvaluation(_pop_scorer_models(models), reference, fd_model)
    click.echo(run_bench(out, n=n, batch_size=batch_size, rows=rows, refiner=refiner, force=force, model=model,
                         dtype=dtype, prompts=prompts, evaluation=evaluation, guide=guide,
                         scorer=scorer, split=split, overwrite=overwrite, threads=threads, rounds=rounds,
                         npnet=npnet, scheduler=scheduler).read_text())


@main.command()
@click.option("--n", default=200, help="bench images per row (the full bench uses 1000)")
@click.option("--out", type=PATH, required=True)
@_overwrite_option("a demo")
@_timing_options
@_friendly_errors
def demo(n: int, out: Path, overwrite: bool, threads: int, rounds: int) -> None:
    """The main job on the embedded default: picture grid (grid.png) + bench table.

    Example: noiserefine demo --out runs/demo
    """
    from noiserefine.demo import run_demo

    click.echo(run_demo(out, n=n, overwrite=overwrite, threads=threads, rounds=rounds).read_text())


@main.command()
@click.option("--out", type=PATH, required=True, help="report folder (its parent must exist): index.html, "
              "report.json, the PNGs and cache/")
@click.option("--quick", is_flag=True, help="every item at a small n (about 3 minutes; what the tests run)")
@click.option("--resume", is_flag=True, help="reuse the cache in --out: a killed run goes on, a finished one is "
              "re-rendered")
@_overwrite_option("a report and its cache")
@_friendly_errors
def report(out: Path, quick: bool, resume: bool, overwrite: bool) -> None:
    """Regenerate the papers' evidence on the shipped models and the bench's test split: one HTML
    page (index.html) with the paper's claim, ours and a verdict per item, report.json and the PNGs
    (full: at most 40 minutes on 2 cores; a killed run resumes with --resume).

    Example: noiserefine report --out runs/report
    """
    from noiserefine.report.run import run_report

    page = run_report(out, quick=quick, resume=resume, overwrite=overwrite)
    click.echo(f"wrote {page}, {page.parent / 'report.json'} and the figures beside them")


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise NoiseRefineError(f"expected numbers like 2 or 1.5,3,5, got {text!r}") from None


if __name__ == "__main__":
    main()
