"""Guided-target datasets for NoiseRefine (paper section 3.2, D.2.1): (x_T, prompt, x_0^Guide).

Each seed gives one target: x_T from the seed (one generator per seed), a prompt taken in turn
from the prompt list, and x_0^Guide sampled with guidance (CFG, PAG or both) in N' steps.
Targets are written in safetensors shards of `shard_size` samples plus `manifest.json`. A killed
run resumes: finished shards (written atomically) are kept, the rest are generated. Every target
carries a score (pluggable; shapes16 uses the judge's probability of the prompt) so training can
keep the best fraction, as the paper keeps the top-N by aesthetic score.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from noiserefine.backbones.base import Backbone, same_model
from noiserefine.errors import NoiseRefineError
from noiserefine.guidance import Guidance
from noiserefine.io import ensure_out_dir, load_tensors, read_json, save_tensors, write_json
from noiserefine.sampling import denoise, make_scheduler, noise_for_seeds
from noiserefine.scoring import Scorer


@dataclass
class TargetSpec:
    """What a target folder holds; a resumed run must ask for the same thing."""

    prompts: list[str]
    seeds: list[int]
    cfg: list[float]
    pag: float = 0.0
    steps: int = 20
    scheduler: str = "ddim"
    shard_size: int = 256
    score: str = "none"
    guidance_start: float = 0.0
    guidance_stop: float = 1.0

    def __post_init__(self) -> None:
        self.guidance(1.0)  # a bad interval fails here, before any folder is written

    def guidance(self, cfg: float) -> Guidance:
        """The teacher's guidance at CFG scale `cfg` (PAG scale and interval from the spec)."""
        return Guidance(cfg=cfg, pag=self.pag, start=self.guidance_start, stop=self.guidance_stop)

    def pair(self, i: int) -> tuple[str, int, float]:
        """(prompt, seed, cfg) of target i: prompts and CFG scales are taken in turn."""
        return self.prompts[i % len(self.prompts)], self.seeds[i], self.cfg[i % len(self.cfg)]

    @property
    def num_shards(self) -> int:
        return -(-len(self.seeds) // self.shard_size)


def generate_targets(backbone: Backbone, spec: TargetSpec, out: Path, scorer: Scorer | None = None,
                     batch_size: int = 64, shard_ids: Sequence[int] | None = None,
                     progress: bool = True) -> Path:
    """Generate (or resume) a target folder. `shard_ids` restricts this process to some shards
    (multi-process generation writes disjoint shards into one folder)."""
    out = ensure_out_dir(out)
    _check_or_write_manifest(out, spec, backbone)
    todo = [k for k in (shard_ids if shard_ids is not None else range(spec.num_shards))
            if not _shard_done(out, k)]
    total = sum(len(_shard_range(spec, k)) for k in todo)
    bar = tqdm(total=total, disable=not progress, desc="targets", unit="img")
    t0 = time.time()
    for k in todo:
        _write_shard(backbone, spec, out, k, scorer, batch_size, bar)
        bar.set_postfix(img_per_s=f"{bar.n / max(time.time() - t0, 1e-9):.1f}")
    bar.close()
    return out


def _shard_range(spec: TargetSpec, k: int) -> range:
    return range(k * spec.shard_size, min((k + 1) * spec.shard_size, len(spec.seeds)))


RESULTS = ("manifest.json", "shard-*.safetensors")
"""What a target folder holds (`OutputFolder` results): its manifest and its shards."""


def _shard_path(out: Path, k: int) -> Path:
    return out / f"shard-{k:05d}.safetensors"


def _shard_done(out: Path, k: int) -> bool:
    return _shard_path(out, k).is_file()


def _write_shard(backbone: Backbone, spec: TargetSpec, out: Path, k: int, scorer: Scorer | None,
                 batch_size: int, bar: tqdm) -> None:
    idx = list(_shard_range(spec, k))
    parts: dict[str, list[torch.Tensor]] = {"x_T": [], "x_0": [], "score": []}
    for lo in range(0, len(idx), batch_size):
        batch = idx[lo: lo + batch_size]
        x_T, x_0, score = _generate_batch(backbone, spec, batch, scorer)
        parts["x_T"].append(x_T)
        parts["x_0"].append(x_0)
        parts["score"].append(score)
        bar.update(len(batch))
    tensors = {name: torch.cat(v) for name, v in parts.items()}
    tensors["index"] = torch.tensor(idx, dtype=torch.long)
    tensors["cfg"] = torch.tensor([spec.pair(i)[2] for i in idx], dtype=torch.float32)
    save_tensors(_shard_path(out, k), tensors)


@torch.no_grad()
def _generate_batch(backbone: Backbone, spec: TargetSpec, batch: list[int], scorer: Scorer | None):
    prompts = [spec.pair(i)[0] for i in batch]
    seeds = [spec.pair(i)[1] for i in batch]
    cfgs = torch.tensor([spec.pair(i)[2] for i in batch])
    x_T = noise_for_seeds(seeds, backbone.latent_shape).to(backbone.device, backbone.dtype)
    cond = backbone.encode_prompts(prompts)
    uncond = backbone.encode_prompts([""] * len(batch))
    x_0 = torch.empty_like(x_T)
    for w in cfgs.unique():  # one sampler run per CFG scale present in the batch
        sel = (cfgs == w).nonzero().squeeze(1)
        sched = make_scheduler(spec.scheduler, backbone.scheduler_config)
        x_0[sel] = denoise(backbone, sched, x_T[sel], {k: v[sel] for k, v in cond.items()},
                           uncond={k: v[sel] for k, v in uncond.items()},
                           guidance=spec.guidance(float(w)), steps=spec.steps)
    score = scorer(backbone.decode(x_0), prompts).float().cpu() if scorer else torch.zeros(len(batch))
    return x_T.cpu(), x_0.cpu(), score


def _check_or_write_manifest(out: Path, spec: TargetSpec, backbone: Backbone) -> None:
    record = {"spec": asdict(spec), "base": backbone.fingerprint(), "latent_shape": list(backbone.latent_shape)}
    path = out / "manifest.json"
    if path.is_file():
        found = _read_manifest(out)
        if {**found, "base": None} != {**record, "base": None} or not same_model(found["base"], record["base"]):
            raise NoiseRefineError(f"{out} holds targets of another spec or base model; use a new folder")
        return
    write_json(path, record)


@dataclass
class TargetSet:
    """Targets loaded for training (the kept fraction only)."""

    x_T: torch.Tensor
    x_0: torch.Tensor
    prompts: list[str]
    cfg: torch.Tensor
    score: torch.Tensor
    manifest: dict

    def __len__(self) -> int:
        return self.x_T.shape[0]


def load_targets(folders: Path | Sequence[Path], keep_fraction: float = 1.0) -> TargetSet:
    """Load every finished shard of one or more target folders and keep the best `keep_fraction`
    of all of them by score (ties by order). Several folders must share the base model and the
    teacher (guidance, steps, scheduler, score), e.g. one made later to add seeds."""
    folders = [Path(folders)] if isinstance(folders, (str, Path)) else [Path(f) for f in folders]
    if not 0 < keep_fraction <= 1:
        raise NoiseRefineError(f"keep fraction must be in (0, 1], got {keep_fraction}")
    parts = [_load_folder(f) for f in folders]
    manifest = parts[0][2]
    for folder, (_, _, other) in zip(folders[1:], parts[1:]):
        if not same_model(other["base"], manifest["base"]) or _teacher_of(other) != _teacher_of(manifest):
            raise NoiseRefineError(f"{folder} was made by another base model or teacher than {folders[0]}")
    data = {k: torch.cat([p[0][k] for p in parts]) for k in parts[0][0]}
    prompts = [prompt for p in parts for prompt in p[1]]
    n_keep = max(1, round(keep_fraction * len(prompts)))
    order = torch.sort(data["score"], descending=True, stable=True).indices[:n_keep].sort().values
    return TargetSet(
        x_T=data["x_T"][order], x_0=data["x_0"][order], prompts=[prompts[i] for i in order],
        cfg=data["cfg"][order], score=data["score"][order], manifest=manifest)


def _load_folder(folder: Path) -> tuple[dict[str, torch.Tensor], list[str], dict]:
    manifest = _read_manifest(folder)
    spec = TargetSpec(**manifest["spec"])
    shards = [load_tensors(_shard_path(folder, k)) for k in range(spec.num_shards) if _shard_done(folder, k)]
    if not shards:
        raise NoiseRefineError(f"{folder} has no finished target shards yet")
    data = {k: torch.cat([s[k] for s in shards]) for k in shards[0]}
    return data, [spec.pair(int(i))[0] for i in data["index"]], manifest


def _read_manifest(folder: Path) -> dict:
    """A folder's manifest with its spec completed by TargetSpec's defaults, so folders written
    before a field existed (e.g. the guidance interval) read as they were made."""
    manifest = read_json(folder / "manifest.json")
    manifest["spec"] = asdict(TargetSpec(**manifest["spec"]))
    return manifest


def _teacher_of(manifest: dict) -> tuple:
    spec = manifest["spec"]
    return (manifest["latent_shape"], sorted(spec["cfg"]), spec["pag"], spec["steps"],
            spec["scheduler"], spec["score"], spec["guidance_start"], spec["guidance_stop"])
