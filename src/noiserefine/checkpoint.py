"""Resumable training state: atomic checkpoints that a killed run picks up exactly.

A checkpoint folder holds one file, `state.safetensors`: every tensor (weights, optimizer moments)
and, in the safetensors header, the training record as JSON (step, optimizer scalars, losses,
configuration). One file means one atomic publication: the file is written under a temporary
name and renamed over the previous checkpoint (`io.save_tensors`), so a run killed at any point
of a save leaves either the complete previous checkpoint or the complete new one, never a mix.
A temporary file left by a killed save is removed by the next save and never read.

Folders written before this layout hold `state.json` beside the weights (two files replaced one
after the other). They still load; a pair torn by a kill between the two writes (weights newer
than the record) is detected from the optimizer's step count and refused with a clear error.
The next save converts the folder to the one-file layout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from noiserefine.errors import NoiseRefineError
from noiserefine.io import read_json, save_tensors

WEIGHTS = "state.safetensors"
RECORD_KEY = "noiserefine.checkpoint"  # header entry holding the training record (JSON)
LEGACY_RECORD = "state.json"  # the record file of the old two-file layout


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten an optimizer state dict into tensors + JSON-able scalars."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"opt.{pid}.{key}"] = val
            else:
                scalars[f"{pid}.{key}"] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, val in tensors.items():
        if name.startswith("opt."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = val
    for name, val in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = val
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def read_checkpoint(folder: Path) -> dict[str, Any] | None:
    """The training record of the checkpoint in `folder` (step, optimizer scalars and what the
    trainer added: losses, config, ...), or None when the folder holds no checkpoint."""
    loaded = _read(Path(folder), with_tensors=False)
    return None if loaded is None else loaded[0]


def check_resume_config(folder: Path, config: dict[str, Any], may_change: tuple[str, ...] = ()) -> None:
    """Refuse to resume the checkpoint in `folder` if it was written with another configuration
    (a resumed run would silently mix two recipes). Keys in `may_change` (e.g. the step budget) are
    not compared. No checkpoint: nothing to check. Call it before loading any weights."""
    record = read_checkpoint(folder)
    if record is None:
        return
    saved = {k: v for k, v in record.get("config", {}).items() if k not in may_change}
    config = {k: v for k, v in config.items() if k not in may_change}
    changed = sorted(k for k in saved.keys() | config.keys() if saved.get(k, "<absent>") != config.get(k, "<absent>"))
    if changed:
        detail = ", ".join(f"{k} {saved.get(k, '<absent>')} -> {config.get(k, '<absent>')}" for k in changed)
        raise NoiseRefineError(f"{Path(folder).parent} holds a run with another configuration ({detail}); "
                               "resume with the same settings or use a new folder")


def save_checkpoint(folder: Path, step: int, modules: dict[str, torch.nn.Module],
                    opt: torch.optim.Optimizer, extra: dict[str, Any] | None = None) -> None:
    """Write the checkpoint of `step` atomically: one file, published by one rename. Removes what a
    killed earlier save left (temporary files) and, after publishing, an old-layout `state.json`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for leftover in folder.glob(f"{WEIGHTS}.*.tmp"):  # io.save_tensors' temporary names
        leftover.unlink(missing_ok=True)
    tensors = {f"{n}.{k}": v for n, m in modules.items() for k, v in m.state_dict().items()}
    opt_t, opt_meta = optimizer_tensors(opt)
    record = {"step": step, "optimizer": opt_meta, **(extra or {})}
    save_tensors(folder / WEIGHTS, tensors | opt_t, metadata={RECORD_KEY: json.dumps(record, sort_keys=True)})
    (folder / LEGACY_RECORD).unlink(missing_ok=True)  # superseded: the record is inside the weights now


def load_checkpoint(folder: Path, modules: dict[str, torch.nn.Module],
                    opt: torch.optim.Optimizer) -> dict[str, Any] | None:
    """Restore modules and optimizer; returns the training record, or None when there is no checkpoint."""
    loaded = _read(Path(folder), with_tensors=True)
    if loaded is None:
        return None
    record, tensors = loaded
    for n, m in modules.items():
        m.load_state_dict({k[len(n) + 1:]: v for k, v in tensors.items() if k.startswith(n + ".")})
    load_optimizer(opt, tensors, record["optimizer"])
    return record


def _read(folder: Path, with_tensors: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """(record, tensors) of the checkpoint in `folder` from one open of its file; None if none."""
    path = folder / WEIGHTS
    if not path.is_file():
        if (folder / LEGACY_RECORD).is_file():
            raise NoiseRefineError(f"checkpoint {folder} has {LEGACY_RECORD} but no {WEIGHTS}: it is incomplete; "
                                   "restore the weights file or delete the folder to start over")
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            legacy = RECORD_KEY not in header
            tensors = {k: f.get_tensor(k) for k in f.keys()} if with_tensors or legacy else {}
    except (SafetensorError, OSError, ValueError) as err:
        raise NoiseRefineError(f"checkpoint file {path} is truncated or corrupt ({err})") from None
    if not legacy:
        return json.loads(header[RECORD_KEY]), tensors
    return _legacy_record(folder, tensors), tensors


def _legacy_record(folder: Path, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The record of an old two-file checkpoint, after checking that its weights are not newer than
    it: the old save replaced the weights first, so a kill in between left new weights with the
    previous record. The optimizer's step count (Adam's `step`) tells the weights' step."""
    if not (folder / LEGACY_RECORD).is_file():
        raise NoiseRefineError(f"{folder / WEIGHTS} has no training record (an old-layout checkpoint cut by a "
                               "kill before its first state.json): delete the folder to start over")
    record = read_json(folder / LEGACY_RECORD)
    counts = [int(v.max()) for k, v in tensors.items() if k.startswith("opt.") and k.endswith(".step")]
    if counts and max(counts) > record["step"]:
        raise NoiseRefineError(
            f"checkpoint {folder} is torn (old two-file layout): {LEGACY_RECORD} is at step {record['step']} but the "
            f"weights at step {max(counts)}, a kill between its two writes; delete the folder to start over")
    return record
