"""The Python API behind the CLI: load a model and a noise method, sample, make targets.

    from noiserefine.api import load_refiner, refine_noise
    refiner = load_refiner()                      # shipped refiner on the shipped shapes16 model
    x_hat = refine_noise(refiner, x_T, prompts)   # then sample unguided from x_hat
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from noiserefine.backbones.base import Backbone
from noiserefine.backbones.loading import load_backbone
from noiserefine.generation import GaussianNoise, NoiseMethod, SamplingOptions, generate_latents
from noiserefine.guidance import Guidance, check_guide
from noiserefine.io import atomic_write_bytes, ensure_out_dir, shipped_path
from noiserefine.methods.refine import NoiseRefiner, RefinedNoise
from noiserefine.sampling import to_uint8
from noiserefine.targets import TargetSpec, generate_targets

SHIPPED_REFINER = "shapes16-refiner.safetensors"


def load_refiner(backbone: Backbone | None = None, path: str | Path | None = None,
                 force: bool = False) -> NoiseRefiner:
    """A refiner on `backbone` (default: the shipped shapes16 model and its shipped refiner)."""
    backbone = backbone or load_backbone()
    return NoiseRefiner.load(backbone, Path(path) if path else shipped_path(SHIPPED_REFINER), force=force)


def refine_noise(refiner: NoiseRefiner, x_T: torch.Tensor, prompts: Sequence[str],
                 strength: float = 1.0, guidance_scale: float | None = None) -> torch.Tensor:
    """Refined unit-variance noise for `prompts`; pass it to any sampler or pipeline (`latents=`)."""
    return RefinedNoise(refiner, strength, guidance_scale)(x_T, prompts)


def build_method(name: str, backbone: Backbone, refiner: Path | None = None, strength: float = 1.0,
                 force: bool = False, **opts: Any) -> NoiseMethod:
    """A noise method by its CLI name."""
    if name == "gaussian":
        return GaussianNoise()
    if name == "refined":
        return RefinedNoise(load_refiner(backbone, refiner, force), strength)
    from noiserefine.methods import registry

    if name == "golden":
        opts = {"path": refiner, "force": force, **opts}  # --refiner names the NPNet file here
    return registry.build(name, backbone, **opts)


def sample_to_folder(prompts: Sequence[str], seeds: Sequence[int], out: Path, *, method: str = "gaussian",
                     refiner: Path | None = None, strength: float = 1.0, force: bool = False,
                     cfg: float = 1.0, pag: float = 0.0, steps: int = 20, scheduler: str = "ddim",
                     model: str | None = None, batch_size: int = 64, dtype: str | None = None,
                     guidance_start: float = 0.0, guidance_stop: float = 1.0, auto: float = 1.0,
                     guide: str | None = None) -> Path:
    """One PNG per (prompt, seed), plus `manifest.jsonl` (file, prompt, seed, method, cfg, pag, auto,
    steps, scheduler, strength, guidance_start, guidance_stop). `auto` is the autoguidance scale
    with the guide model `guide` (default: the embedded model's shipped guide)."""
    guidance = Guidance(cfg, pag, guidance_start, guidance_stop, auto)
    out = ensure_out_dir(out)
    backbone = load_backbone(model, guide=guide, dtype=dtype)
    check_guide(backbone, guidance)
    search = ({"cfg": cfg, "pag": pag, "steps": steps, "guidance_start": guidance_start, "guidance_stop": guidance_stop,
               "auto": auto}
              if method in ("noise-diffusion", "best-of-n") else {})
    noise = build_method(method, backbone, refiner=refiner, strength=strength, force=force, **search)
    pairs = [(p, s) for p in prompts for s in seeds]
    _validate_prompts(backbone, prompts)
    options = SamplingOptions(guidance, steps, scheduler, batch_size)
    latents = generate_latents(backbone, [p for p, _ in pairs], [s for _, s in pairs], noise, options, progress=True)
    images = to_uint8(torch.cat([backbone.decode(latents[i: i + batch_size]) for i in range(0, len(latents), batch_size)]))
    rows = []
    for k, ((prompt, seed), img) in enumerate(zip(pairs, images)):
        name = f"{k:05d}_seed{seed}.png"
        Image.fromarray(img).save(out / name)
        rows.append({"file": name, "prompt": prompt, "seed": seed, "method": method, "cfg": cfg, "pag": pag,
                     "auto": auto, "steps": steps, "scheduler": scheduler, "strength": strength if method == "refined" else None,
                     "guidance_start": guidance_start, "guidance_stop": guidance_stop})
    atomic_write_bytes(out / "manifest.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    return out


def make_targets(prompts: Sequence[str], seeds: Sequence[int], cfg: Sequence[float], out: Path, *,
                 pag: float = 0.0, guidance_start: float = 0.0, guidance_stop: float = 1.0, steps: int = 20,
                 scheduler: str = "ddim", shard_size: int = 256,
                 score: str = "judge", model: str | None = None, batch_size: int = 64, dtype: str | None = None,
                 clip_model: str | None = None, aesthetic_model: str | None = None) -> Path:
    """Guided targets for NoiseRefine (see `noiserefine.targets`)."""
    backbone = load_backbone(model, dtype=dtype)
    _validate_prompts(backbone, prompts)
    spec = TargetSpec(prompts=list(prompts), seeds=list(seeds), cfg=list(cfg), pag=pag, steps=steps,
                      scheduler=scheduler, shard_size=shard_size, score=score,
                      guidance_start=guidance_start, guidance_stop=guidance_stop)
    # Under `accelerate launch`, process i writes shards i, i+P, i+2P, ... of the same folder.
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    shard_ids = range(state.process_index, spec.num_shards, state.num_processes)
    scorer = _scorer(score, backbone, clip_model, aesthetic_model)
    generate_targets(backbone, spec, out, scorer=scorer, batch_size=batch_size, shard_ids=shard_ids,
                     progress=state.is_main_process)
    state.wait_for_everyone()
    return Path(out)


def _scorer(name: str, backbone: Backbone, clip_model: str | None, aesthetic_model: str | None):
    """Target score: 'none', 'judge' (shapes16), or a real-image scorer from local models."""
    if name == "none":
        return None
    if name == "judge":
        from noiserefine.evaluation.judge import load_judge

        judge = load_judge("primary")
        return lambda images, prompts: judge.prompt_probability(images, prompts)
    from noiserefine.evaluation.scorers import load_scorer

    return load_scorer(name, clip_model=clip_model, aesthetic_model=aesthetic_model, device=backbone.device)


def _validate_prompts(backbone: Backbone, prompts: Sequence[str]) -> None:
    """Encode once up front so an unknown word fails before any work is done."""
    backbone.encode_prompts(list(prompts))
