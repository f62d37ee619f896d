"""Guided-target datasets for NoiseRefine (paper section 3.2, D.2.1): (x_T, prompt, x_0^Guide).

Each seed gives one target: x_T from the seed (one generator per seed), a prompt taken in turn
from the prompt list, and x_0^Guide sampled by the teacher (any `Guidance`: CFG, PAG, autoguidance, an interval) in N' steps.
Targets are written to a shard store (`noiserefine.shards`: safetensors shards of `shard_size`
samples plus `manifest.json`, which also records the teacher's sampler: scheduler, timestep
spacing, offset, prediction type and timesteps, the model's own by default). A killed run resumes:
finished shards are kept, a partly written one continues from its last finished batch, the rest
are generated. Training reads the targets shard by shard (`load_targets`). Every target
carries a score (pluggable; shapes16 uses the judge's probability of the prompt) so training can
keep the best fraction, as the paper keeps the top-N by aesthetic score.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from noiserefine.backbones.base import Backbone, same_model
from noiserefine.errors import NoiseRefineError
from noiserefine.generation import SamplingOptions, sample_from_noise
from noiserefine.guidance import Teacher
from noiserefine.sampling import noise_for_seeds, sampler_record
from noiserefine.scoring import Scorer
from noiserefine.shards import ShardRows, ShardStore, read_manifest

LEGACY_SAMPLER = {"timestep_spacing": "trailing"}
"""What is known of the sampler of a folder made before manifests recorded it: it always used
trailing spacing."""


@dataclass
class TargetSpec:
    """What a target folder holds; a resumed run must ask for the same thing. Target i has prompt
    i mod P, seed i, and -- for a scale-conditioned teacher -- teacher scale (i + i div P) mod S, so
    the scales are balanced within each pass over the prompts and every prompt meets every scale
    (with i mod S alone, P a multiple of S would tie each prompt to one scale)."""

    prompts: list[str]
    seeds: list[int]
    teacher: Teacher
    shard_size: int = 256
    score: str = "none"

    def pair(self, i: int) -> tuple[str, int, float]:
        """(prompt, seed, teacher scale) of target i; the scale is the value of the teacher's varied
        guidance field (`Teacher.scale_field`), constant for a teacher of one scale."""
        scales = self.teacher.scales or (getattr(self.teacher.guidance, self.teacher.scale_field),)
        n_prompts = len(self.prompts)
        return self.prompts[i % n_prompts], self.seeds[i], scales[(i + i // n_prompts) % len(scales)]

    def to_record(self) -> dict[str, Any]:
        return {"prompts": self.prompts, "seeds": self.seeds, "teacher": self.teacher.to_record(),
                "shard_size": self.shard_size, "score": self.score}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "TargetSpec":
        """A spec from `to_record`, or from the older flat records (cfg list, pag, steps, scheduler,
        guidance_start/stop at the top level)."""
        teacher = Teacher.from_record(record["teacher"] if "teacher" in record else record)
        return cls(list(record["prompts"]), list(record["seeds"]), teacher, int(record.get("shard_size", 256)),
                   str(record.get("score", "none")))

    @property
    def num_shards(self) -> int:
        return -(-len(self.seeds) // self.shard_size)


def generate_targets(backbone: Backbone, spec: TargetSpec, out: Path, scorer: Scorer | None = None,
                     batch_size: int = 64, shard_ids: Sequence[int] | None = None,
                     progress: bool = True) -> Path:
    """Generate (or resume) a target folder. `shard_ids` restricts this process to some shards
    (multi-process generation writes disjoint shards into one folder)."""
    store = _store(out, spec)
    sampler = sampler_record(spec.teacher.scheduler, backbone.scheduler_config, spec.teacher.steps)
    store.claim({"spec": spec.to_record(), "base": backbone.fingerprint(), "latent_shape": list(backbone.latent_shape),
                 "sampler": sampler}, functools.partial(_read_manifest, legacy_sampler=sampler), same_model)
    todo, total, flushed = store.pending(shard_ids if shard_ids is not None else range(store.num_shards))
    bar = tqdm(total=total, initial=flushed, disable=not progress, desc="targets", unit="img")
    t0 = time.time()

    def on_batch(batch: dict[str, torch.Tensor]) -> None:
        bar.update(len(batch["index"]))
        bar.set_postfix(img_per_s=f"{(bar.n - flushed) / max(time.time() - t0, 1e-9):.1f}")

    store.fill(todo, lambda idx: _target_batch(backbone, spec, idx, scorer), batch_size, on_batch)
    bar.close()
    return store.folder


RESULTS = ("manifest.json", "shard-*.safetensors")
"""What a target folder holds (`OutputFolder` results): its manifest and its shards."""


def _store(folder: Path, spec: TargetSpec) -> ShardStore:
    return ShardStore(Path(folder), len(spec.seeds), spec.shard_size, prefix="shard", items="targets")


def _target_batch(backbone: Backbone, spec: TargetSpec, idx: list[int], scorer: Scorer | None) -> dict[str, torch.Tensor]:
    x_T, x_0, score = _generate_batch(backbone, spec, idx, scorer)
    return {"x_T": x_T, "x_0": x_0, "score": score,
            "cfg": torch.tensor([spec.pair(i)[2] for i in idx], dtype=torch.float32)}


@torch.no_grad()
def _generate_batch(backbone: Backbone, spec: TargetSpec, batch: list[int], scorer: Scorer | None):
    prompts = [spec.pair(i)[0] for i in batch]
    seeds = [spec.pair(i)[1] for i in batch]
    scales = torch.tensor([spec.pair(i)[2] for i in batch])
    x_T = noise_for_seeds(seeds, backbone.latent_shape).to(backbone.device, backbone.dtype)
    x_0 = torch.empty_like(x_T)
    for w in scales.unique():  # one sampler run per teacher scale present in the batch
        sel = (scales == w).nonzero().squeeze(1)
        rows = [prompts[j] for j in sel.tolist()]
        options = SamplingOptions(spec.teacher.at_scale(float(w)), spec.teacher.steps, spec.teacher.scheduler)
        x_0[sel] = sample_from_noise(backbone, x_T[sel], rows, options)
    score = scorer(backbone.decode(x_0), prompts).float().cpu() if scorer else torch.zeros(len(batch))
    return x_T.cpu(), x_0.cpu(), score


@dataclass
class TargetSet:
    """Targets opened for training (the kept fraction only): prompts, teacher scales and scores in
    memory, x_T and x_0 as `ShardRows` views that read the rows asked for from the shard files
    (`data.x_0[idx]` is a tensor), so memory does not grow with the set."""

    x_T: ShardRows
    x_0: ShardRows
    prompts: list[str]
    cfg: torch.Tensor
    score: torch.Tensor
    manifest: dict

    def __len__(self) -> int:
        return len(self.prompts)


def load_targets(folders: Path | Sequence[Path], keep_fraction: float = 1.0) -> TargetSet:
    """Open every finished shard of one or more target folders and keep the best `keep_fraction`
    of each teacher scale's targets by score (`best_per_scale`); only scores, scales and indices are
    read now. Several
    folders must share the base model and the teacher (guidance, steps, scheduler, sampler, score),
    e.g. one made later to add seeds."""
    folders = [Path(folders)] if isinstance(folders, (str, Path)) else [Path(f) for f in folders]
    if not 0 < keep_fraction <= 1:
        raise NoiseRefineError(f"keep fraction must be in (0, 1], got {keep_fraction}")
    parts = [_open_folder(f) for f in folders]
    manifest = parts[0].manifest
    for folder, other in zip(folders[1:], parts[1:]):
        if (not same_model(other.manifest["base"], manifest["base"])
                or _teacher_of(other.manifest) != _teacher_of(manifest)
                or not _same_sampler(other.manifest["sampler"], manifest["sampler"])):
            raise NoiseRefineError(f"{folder} was made by another base model or teacher than {folders[0]}")
    cfg, score = torch.cat([p.cfg for p in parts]), torch.cat([p.score for p in parts])
    prompts = [prompt for p in parts for prompt in p.prompts]
    order = best_per_scale(score, cfg, keep_fraction)
    rows = {name: ShardRows.cat([p.rows[name] for p in parts]).subset(order) for name in ("x_T", "x_0")}
    return TargetSet(x_T=rows["x_T"], x_0=rows["x_0"], prompts=[prompts[i] for i in order], cfg=cfg[order],
                     score=score[order], manifest=manifest)


def best_per_scale(score: torch.Tensor, scale: torch.Tensor, keep_fraction: float) -> np.ndarray:
    """Indices (ascending) of the best `keep_fraction` of the targets of each teacher scale by score,
    ties by order: a scale-conditioned refiner keeps every scale's share (a global cut would drop
    mostly the weak scales' targets and teach the refiner a filtered, stronger teacher there)."""
    kept = []
    for w in scale.unique():
        idx = (scale == w).nonzero().squeeze(1)
        n_keep = max(1, round(keep_fraction * len(idx)))
        kept.append(idx[torch.sort(score[idx], descending=True, stable=True).indices[:n_keep]])
    return torch.cat(kept).sort().values.numpy()


@dataclass
class _Folder:
    """One target folder opened: per finished target its prompt, scale and score, and views of its latents."""

    prompts: list[str]
    cfg: torch.Tensor
    score: torch.Tensor
    rows: dict[str, ShardRows]
    manifest: dict


def _open_folder(folder: Path) -> _Folder:
    manifest = _read_manifest(folder)
    spec = TargetSpec.from_record(manifest["spec"])
    store = _store(folder, spec)
    small = store.load(["index", "cfg", "score"])
    return _Folder([spec.pair(int(i))[0] for i in small["index"]], small["cfg"], small["score"],
                   {name: store.rows(name) for name in ("x_T", "x_0")}, manifest)


def _read_manifest(folder: Path, legacy_sampler: dict | None = None) -> dict:
    """A folder's manifest with its spec in today's form (`TargetSpec.from_record`), so folders
    written before a field existed (e.g. the guidance interval, autoguidance) read as they were made.
    A folder from before the sampler was recorded gets `LEGACY_SAMPLER`, or `legacy_sampler` (the
    sampler of a run resuming it) when that one also spaces its steps "trailing": then they are the same."""
    manifest = read_manifest(folder, "targets")
    manifest["spec"] = TargetSpec.from_record(manifest["spec"]).to_record()
    if "sampler" not in manifest:
        same = legacy_sampler is not None and _same_sampler(LEGACY_SAMPLER, legacy_sampler)
        manifest["sampler"] = legacy_sampler if same else dict(LEGACY_SAMPLER)
    return manifest


def _same_sampler(a: dict, b: dict) -> bool:
    """Whether two sampler records agree on every setting both record (a folder from before the
    record existed records only its spacing)."""
    return all(a[k] == b[k] for k in a.keys() & b.keys())


def _teacher_of(manifest: dict) -> tuple:
    spec = manifest["spec"]
    teacher = {**spec["teacher"], "scales": sorted(spec["teacher"]["scales"])}
    return manifest["latent_shape"], json.dumps(teacher, sort_keys=True), spec["score"]
