"""Resumable training state: atomic checkpoints that a killed run picks up exactly.

A checkpoint folder holds `state.safetensors` (every tensor: weights, optimizer moments) and
`state.json` (step and scalars). Both are written atomically, the JSON last, so a run killed
mid-write leaves the previous complete checkpoint readable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from noiserefine.errors import NoiseRefineError
from noiserefine.io import load_tensors, read_json, save_tensors, write_json


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


def check_resume_config(folder: Path, config: dict[str, Any], may_change: tuple[str, ...] = ()) -> None:
    """Refuse to resume the checkpoint in `folder` if it was written with another configuration
    (a resumed run would silently mix two recipes). Keys in `may_change` (e.g. the step budget) are
    not compared. No checkpoint: nothing to check. Call it before loading any weights."""
    path = Path(folder) / "state.json"
    if not path.is_file():
        return
    saved = {k: v for k, v in read_json(path).get("config", {}).items() if k not in may_change}
    config = {k: v for k, v in config.items() if k not in may_change}
    changed = sorted(k for k in saved.keys() | config.keys() if saved.get(k, "<absent>") != config.get(k, "<absent>"))
    if changed:
        detail = ", ".join(f"{k} {saved.get(k, '<absent>')} -> {config.get(k, '<absent>')}" for k in changed)
        raise NoiseRefineError(f"{Path(folder).parent} holds a run with another configuration ({detail}); "
                               "resume with the same settings or use a new folder")


def save_checkpoint(folder: Path, step: int, modules: dict[str, torch.nn.Module],
                    opt: torch.optim.Optimizer, extra: dict[str, Any] | None = None) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"{n}.{k}": v for n, m in modules.items() for k, v in m.state_dict().items()}
    opt_t, opt_meta = optimizer_tensors(opt)
    save_tensors(folder / "state.safetensors", tensors | opt_t)
    write_json(folder / "state.json", {"step": step, "optimizer": opt_meta, **(extra or {})})


def load_checkpoint(folder: Path, modules: dict[str, torch.nn.Module],
                    opt: torch.optim.Optimizer) -> dict[str, Any] | None:
    """Restore modules and optimizer; returns the JSON record, or None when there is no checkpoint."""
    folder = Path(folder)
    if not (folder / "state.json").is_file():
        return None
    meta = read_json(folder / "state.json")
    tensors = load_tensors(folder / "state.safetensors")
    for n, m in modules.items():
        m.load_state_dict({k[len(n) + 1:]: v for k, v in tensors.items() if k.startswith(n + ".")})
    load_optimizer(opt, tensors, meta["optimizer"])
    return meta
