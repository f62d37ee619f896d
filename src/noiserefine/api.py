"""The Python API behind the CLI: load a model and a noise method, sample, make targets.

    from noiserefine.api import load_refiner, refine_noise
    refiner = load_refiner()                      # shipped refiner on the shipped shapes16 model
    x_hat = refine_noise(refiner, x_T, prompts)   # then sample unguided from x_hat
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from noiserefine.backbones.base import Backbone
from noiserefine.backbones.loading import load_backbone
from noiserefine.errors import NoiseRefineError
from noiserefine.evaluation.scorers import ScorerModels
from noiserefine.generation import SamplingOptions
from noiserefine.guidance import Teacher, check_guide
from noiserefine.io import OutputFolder
from noiserefine.methods import registry
from noiserefine.methods.refine import NoiseRefiner, RefinedNoise
from noiserefine.methods.registry import MethodContext
from noiserefine.samples import plan_samples, sample_rows, write_samples
from noiserefine.sampling import make_scheduler
from noiserefine.targets import RESULTS as TARGET_RESULTS, TargetSpec, generate_targets


def load_refiner(backbone: Backbone | None = None, path: str | Path | None = None,
                 force: bool = False) -> NoiseRefiner:
    """A refiner on `backbone` (default: the shipped shapes16 model and its shipped refiner)."""
    backbone = backbone or load_backbone()
    weights = {"refined": Path(path)} if path else {}
    return MethodContext(backbone, weights=weights, force=force).load("refined", NoiseRefiner.load)


def refine_noise(refiner: NoiseRefiner, x_T: torch.Tensor, prompts: Sequence[str],
                 strength: float = 1.0, guidance_scale: float | None = None) -> torch.Tensor:
    """Refined unit-variance noise for `prompts`; pass it to any sampler or pipeline (`latents=`)."""
    return RefinedNoise(refiner, strength, guidance_scale)(x_T, prompts)


def method_context(backbone: Backbone, sampling: SamplingOptions, *, weights: Mapping[str, Path] | None = None,
                   force: bool = False, scorer: str | None = None,
                   scorer_models: ScorerModels | None = None) -> MethodContext:
    """What noise methods are built against: `weights` maps a method to its weights file (default:
    the shipped ones); `scorer` names the search methods' scorer (default: the backbone's own, the
    primary judge on shapes16), built from the local paths in `scorer_models` with its scores in
    [0, 1] (`noiserefine.evaluation.scorers`)."""
    from noiserefine.evaluation.scorers import scorer_for

    searcher = scorer_for(backbone, scorer, scorer_models or ScorerModels(), search=True)
    return MethodContext(backbone, sampling, searcher, dict(weights or {}), force)


def sample_to_folder(prompts: Sequence[str], seeds: Sequence[int], out: Path, *, method: str = "gaussian",
                     method_options: dict[str, Any] | None = None, sampling: SamplingOptions = SamplingOptions(),
                     refiner: Path | None = None, force: bool = False, model: str | None = None,
                     dtype: str | None = None, guide: str | None = None, scorer: str | None = None,
                     scorer_models: ScorerModels | None = None, overwrite: bool = False) -> Path:
    """One PNG per (prompt, seed) of noise `method` sampled with `sampling`, plus `manifest.jsonl`
    (file, prompt, seed, method, its options, the guidance record, steps, scheduler). `refiner` is
    the method's weights file (a refiner or an NPNet; default: the shipped one); autoguidance uses
    the guide model `guide` (default: the embedded model's shipped guide). A folder holding samples
    of the same settings is resumed, one of other settings refused unless `overwrite`
    (`noiserefine.samples`); nothing is written before every input has been validated."""
    registry.check_weights(method, refiner)
    options = registry.entry(method).defaults() | (method_options or {})
    record = {"method": method, **options, **sampling.guidance.to_record(), "steps": sampling.steps,
              "scheduler": sampling.scheduler}
    rows = sample_rows(prompts, seeds, record)
    folder, todo = plan_samples(out, rows, overwrite)
    backbone = load_backbone(model, guide=guide, dtype=dtype)
    check_guide(backbone, sampling.guidance)
    _validate_prompts(backbone, prompts)
    make_scheduler(sampling.scheduler, backbone.scheduler_config)  # an unknown scheduler fails here
    ctx = method_context(backbone, sampling, weights={method: refiner} if refiner else {}, force=force, scorer=scorer,
                         scorer_models=scorer_models)
    noise = registry.build(method, ctx, **options)
    write_samples(folder.open(), backbone, noise, sampling, rows, todo)
    return folder.path


def make_targets(prompts: Sequence[str], seeds: Sequence[int], teacher: Teacher, out: Path, *,
                 shard_size: int = 256, score: str | None = None, model: str | None = None, batch_size: int = 64,
                 dtype: str | None = None, guide: str | None = None, scorer_models: ScorerModels | None = None,
                 overwrite: bool = False) -> Path:
    """Guided targets of `teacher` for NoiseRefine (see `noiserefine.targets`), scored by `score`
    (default: the backbone's own scorer, the primary judge on shapes16; "none" for no score) with its
    local model paths in `scorer_models` (`noiserefine.evaluation.scorers`). A
    folder of targets is resumed (refused if made by another spec) or, with `overwrite`, replaced."""
    from noiserefine.evaluation.scorers import scorer_for

    folder = OutputFolder(Path(out), TARGET_RESULTS, overwrite=overwrite, resume=True).check()
    if min(batch_size, shard_size) < 1:
        raise NoiseRefineError(f"batch size and shard size must be >= 1, got {batch_size} and {shard_size}")
    backbone = load_backbone(model, guide=guide, dtype=dtype)
    check_guide(backbone, teacher.guidance)
    _validate_prompts(backbone, prompts)
    make_scheduler(teacher.scheduler, backbone.scheduler_config)  # an unknown scheduler fails here
    score = score or getattr(backbone, "default_scorer", None) or "none"
    spec = TargetSpec(prompts=list(prompts), seeds=list(seeds), teacher=teacher, shard_size=shard_size, score=score)
    # Under `accelerate launch`, process i writes shards i, i+P, i+2P, ... of the same folder.
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    shard_ids = range(state.process_index, spec.num_shards, state.num_processes)
    scorer = scorer_for(backbone, score, scorer_models or ScorerModels())
    if state.is_main_process:
        folder.open()  # under `overwrite` the old targets go once, before any process writes
    state.wait_for_everyone()
    generate_targets(backbone, spec, out, scorer=scorer, batch_size=batch_size, shard_ids=shard_ids,
                     progress=state.is_main_process)
    state.wait_for_everyone()
    return Path(out)


def _validate_prompts(backbone: Backbone, prompts: Sequence[str]) -> None:
    """Encode once up front so an unknown word fails before any work is done."""
    backbone.encode_prompts(list(prompts))
