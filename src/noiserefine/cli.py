"""The `noiserefine` command line: thin commands over library functions.

Every command prints a one-line `error: ...` and exits with status 2 on bad input.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable

import click

from noiserefine.errors import NoiseRefineError

PATH = click.Path(path_type=Path)


def _friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except NoiseRefineError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
def main() -> None:
    """Guided diffusion quality at unguided cost: NoiseRefine, Golden Noise and Noise Diffusion.

    Example: noiserefine sample --prompt-file prompts.txt --seeds 0-7 --method refined --out out/

    Several jobs on few CPU cores: run each with OMP_NUM_THREADS=1 (OpenMP threads of
    concurrent processes otherwise thrash).
    """


def _read_prompts(path: Path) -> list[str]:
    if not path.is_file():
        raise NoiseRefineError(f"prompt file not found: {path}")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise NoiseRefineError(f"prompt file {path} has no prompts")
    return prompts


# -- world ------------------------------------------------------------------------------------
@main.group()
def world() -> None:
    """The embedded shapes16 world."""


@world.command("export")
@click.option("--n", default=100, help="number of real renders")
@click.option("--seed", default=0)
@click.option("--out", type=PATH, required=True, help="output folder (its parent must exist)")
@_friendly_errors
def world_export(n: int, seed: int, out: Path) -> None:
    """Write real shapes16 renders (PNG) and labels.jsonl.  Example: noiserefine world export --n 48 --out real/"""
    from noiserefine.world.export import export_world

    click.echo(export_world(out, n, seed))


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
@click.option("--out", type=PATH, required=True, help="run folder (resumes if it holds a checkpoint)")
@_friendly_errors
def train_base_cmd(steps: int, batch_size: int, seed: int, prompt_dropout: float, snapshot_every: int,
                   noise_schedule: str, out: Path) -> None:
    """Train the embedded shapes16 base model (resumable).  Example: noiserefine train-base --out runs/base"""
    from noiserefine.train_base import BaseTrainConfig, train_base

    click.echo(train_base(out, BaseTrainConfig(steps=steps, batch_size=batch_size, seed=seed,
                                               prompt_dropout=prompt_dropout, snapshot_every=snapshot_every,
                                               noise_schedule=noise_schedule)))


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
    if params.get("prompt_file") is not None:
        return _read_prompts(params["prompt_file"])
    from noiserefine.presets import get_preset

    if preset and get_preset(preset).class_prompts:
        return list(get_preset(preset).class_prompts)
    raise NoiseRefineError("--prompt-file is required (one prompt per line)")


def _method_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--method", default="gaussian", help="gaussian | refined | golden | noise-diffusion | best-of-n"),
        click.option("--refiner", type=PATH, default=None, help="refiner .safetensors (default: the shipped one)"),
        click.option("--strength", default=1.0, help="refinement strength s in x_T + s * delta"),
        click.option("--force", is_flag=True, help="load a refiner trained on another base model"),
        click.option("--cfg", default=1.0, help="CFG scale w (1 = off)"),
        click.option("--pag", default=0.0, help="PAG scale s (0 = off)"),
        click.option("--auto", default=1.0, help="autoguidance scale a (1 = off; uses the guide model)"),
        click.option("--guide", default=None, help="guide model for --auto (default: the shipped one of shapes16)"),
        click.option("--guidance-start", default=0.0, help="guide only steps from this fraction of the run on"),
        click.option("--guidance-stop", default=1.0, help="guide only steps before this fraction of the run"),
        click.option("--steps", default=20, help="sampler steps"),
        click.option("--scheduler", default="ddim", help="ddim | euler | dpm++"),
        click.option("--model", default=None, help="base model: shapes16 (default), weights file or pipeline folder"),
        click.option("--batch-size", default=64),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


@main.command()
@click.option("--prompt-file", type=PATH, default=None, help="one prompt per line")
@click.option("--seeds", required=True, help="seed range A-B (inclusive) or list A,B,C")
@_method_options
@click.option("--out", type=PATH, required=True, help="output folder (its parent must exist)")
@_preset_options
@_friendly_errors
def sample(ctx: click.Context, **_: Any) -> None:
    """One image per prompt and seed: PNGs + manifest.jsonl.

    Example: noiserefine sample --prompt-file p.txt --seeds 0-7 --method refined --out samples/
    """
    from noiserefine.api import sample_to_folder
    from noiserefine.sampling import seeds_from_range

    params = _with_preset(ctx, "sample")
    prompts = _prompts_for(params, ctx.params.get("preset"))
    params.pop("prompt_file")
    seeds, out = seeds_from_range(params.pop("seeds")), params.pop("out")
    click.echo(sample_to_folder(prompts, seeds, out, **params))


@main.command("eval")
@click.argument("folder", type=PATH)
@_friendly_errors
def eval_cmd(folder: Path) -> None:
    """Score a folder written by `sample` (adherence, per-attribute accuracy, FD; both judges)."""
    from noiserefine.evaluation.folder import evaluate_folder

    click.echo(json.dumps(evaluate_folder(folder), indent=2))


# -- NoiseRefine ------------------------------------------------------------------------------
@main.command()
@click.option("--prompt-file", type=PATH, default=None, help="one prompt per line")
@click.option("--seeds", required=True, help="one target per seed; prompts are taken in turn")
@click.option("--cfg", default="2.0", help="CFG scale of the teacher; a list 1.5,3,5 for scale conditioning")
@click.option("--pag", default=0.0, help="PAG scale of the teacher")
@click.option("--guidance-start", default=0.0, help="teacher guides steps from this fraction of the run on")
@click.option("--guidance-stop", default=1.0, help="teacher guides steps before this fraction of the run")
@click.option("--steps", default=20, help="teacher sampler steps N'")
@click.option("--scheduler", default="ddim")
@click.option("--shard-size", default=256)
@click.option("--score", default="judge", help="target score for filtering: judge | clip | aesthetic | none")
@click.option("--clip-model", default=None, help="local CLIP folder (for --score clip / aesthetic)")
@click.option("--aesthetic-model", default=None, help="local aesthetic-predictor safetensors")
@click.option("--model", default=None)
@click.option("--batch-size", default=64)
@click.option("--out", type=PATH, required=True, help="target folder (a killed run resumes here)")
@_preset_options
@_friendly_errors
def targets(ctx: click.Context, **_: Any) -> None:
    """Generate guided targets (x_T, prompt, x_0^Guide) in resumable safetensors shards.
    Under `accelerate launch`, processes write disjoint shards of one folder.

    Example: noiserefine targets --prompt-file p.txt --seeds 0-2047 --cfg 2 --out runs/targets
    """
    from noiserefine.api import make_targets
    from noiserefine.sampling import seeds_from_range

    params = _with_preset(ctx, "targets")
    prompts = _prompts_for(params, ctx.params.get("preset"))
    params.pop("prompt_file")
    seeds, cfg, out = seeds_from_range(params.pop("seeds")), _floats(str(params.pop("cfg"))), params.pop("out")
    click.echo(make_targets(prompts, seeds, cfg, out, **params))


@main.command()
@click.option("--targets", "targets_dir", type=PATH, required=True, multiple=True,
              help="target folder (repeat to train on several made by the same teacher)")
@click.option("--steps", default=400, help="optimizer steps")
@click.option("--batch-size", default=32, help="global batch (split across processes)")
@click.option("--lr", default=6e-4)
@click.option("--lr-schedule", default="constant", type=click.Choice(["constant", "cosine"]),
              help="cosine decays the learning rate to 0 over --steps")
@click.option("--loss", default="msd", type=click.Choice(["msd", "full", "noise"]))
@click.option("--msd-steps", default=10, help="unguided sampler steps N inside the loss")
@click.option("--scheduler", default="ddim", help="sampler inside the loss: ddim | euler | dpm++")
@click.option("--rank", default=32, help="LoRA rank")
@click.option("--keep-fraction", default=0.75, help="train on the best fraction of targets by score")
@click.option("--scale-conditioning", is_flag=True, help="condition the refiner on the teacher's CFG scale")
@click.option("--init-from", default=None, help="start from this refiner .safetensors (same rank and layers)")
@click.option("--gradient-checkpointing", is_flag=True, help="recompute denoiser activations in backward")
@click.option("--mixed-precision", type=click.Choice(["no", "fp16", "bf16"]), default=None,
              help="autocast (default: accelerate launch's, else the --dtype's); refiner weights stay fp32")
@click.option("--seed", default=0)
@click.option("--model", default=None)
@click.option("--out", type=PATH, required=True, help="run folder (a killed run resumes here)")
@_preset_options
@_friendly_errors
def train(ctx: click.Context, **_: Any) -> None:
    """Train a NoiseRefine refiner with MSD (resumable; multi-GPU via `accelerate launch`).

    Example: noiserefine train --targets runs/targets --steps 400 --out runs/refiner
    """
    from noiserefine.backbones.loading import load_backbone
    from noiserefine.train import TrainConfig, train_refiner

    params = _with_preset(ctx, "train")
    targets_dirs, out = list(params.pop("targets_dir")), params.pop("out")
    backbone = load_backbone(params.pop("model"), dtype=params.pop("dtype"))
    click.echo(train_refiner(backbone, targets_dirs, out, TrainConfig(**params)))


# -- evaluation -------------------------------------------------------------------------------
@main.command()
@click.option("--n", default=1000, help="images per row")
@click.option("--batch-size", default=250)
@click.option("--rows", default="default", help="comma list of row names, or 'default'")
@click.option("--refiner", type=PATH, default=None)
@click.option("--force", is_flag=True, help="use a refiner trained on another base model")
@click.option("--model", default=None, help="base model: shapes16 (default), weights file, pipeline folder or hub id")
@click.option("--guide", default=None, help="guide model of the autoA rows (default: the shipped one of shapes16)")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None, help="real-model dtype")
@click.option("--prompt-file", type=PATH, default=None, help="prompt pool (default: the 48 shapes16 prompts)")
@click.option("--clip-model", default=None, help="local CLIP folder: CLIP score per row (real models)")
@click.option("--out", type=PATH, required=True)
@_friendly_errors
def bench(n: int, batch_size: int, rows: str, refiner: Path | None, force: bool, model: str | None,
          guide: str | None, dtype: str | None, prompt_file: Path | None, clip_model: str | None, out: Path) -> None:
    """All methods, one process, same prompts and seeds: bench.md + bench.json.

    On shapes16 rows are scored by the judges; on a real model (--model) they carry cost figures
    and, with --clip-model, the CLIP score.

    Example: noiserefine bench --n 1000 --out runs/bench
    """
    from noiserefine.evaluation.bench import run_bench

    prompts = _read_prompts(prompt_file) if prompt_file else None
    click.echo(run_bench(out, n=n, batch_size=batch_size, rows=rows, refiner=refiner, force=force, model=model,
                         dtype=dtype, prompts=prompts, clip_model=clip_model, guide=guide).read_text())


@main.command()
@click.option("--n", default=200, help="bench images per row (the full bench uses 1000)")
@click.option("--out", type=PATH, required=True)
@_friendly_errors
def demo(n: int, out: Path) -> None:
    """The main job on the embedded default: picture grid (grid.png) + bench table.

    Example: noiserefine demo --out runs/demo
    """
    from noiserefine.demo import run_demo

    click.echo(run_demo(out, n=n).read_text())


@main.command()
@click.option("--n", default=300, help="images per measurement")
@click.option("--refiner", type=PATH, default=None)
@click.option("--out", type=PATH, required=True)
@_friendly_errors
def analyze(n: int, refiner: Path | None, out: Path) -> None:
    """Section-5 analyses of a refiner: change size, frequency content, band swaps, strength.

    Example: noiserefine analyze --out runs/analysis
    """
    from noiserefine.analysis import AnalysisInputs, run_analysis
    from noiserefine.api import load_refiner
    from noiserefine.evaluation.bench import bench_setup
    from noiserefine.evaluation.judge import load_judges
    from noiserefine.evaluation.metrics import score_images

    judges = load_judges()
    setup = bench_setup(n, batch_size=n)
    inputs = AnalysisInputs(load_refiner(path=refiner), setup.prompts, setup.seeds,
                            lambda images, prompts: score_images(images, prompts, judges))
    click.echo(json.dumps(run_analysis(inputs, out), indent=2))


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise NoiseRefineError(f"expected numbers like 2 or 1.5,3,5, got {text!r}") from None


if __name__ == "__main__":
    main()
