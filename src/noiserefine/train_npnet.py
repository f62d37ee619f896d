"""NPNet training (Golden Noise, Stage II): MSE(x_T', NPNet(x_T, c)) on the kept re-denoise pairs
("Training and Inference", L_MSE), in the shared resumable loop (`noiserefine.training_loop`).

The pairs come from `noiserefine.npnet_pairs`; the network is `noiserefine.methods.golden.NPNet`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from noiserefine.backbones.base import Backbone, same_model
from noiserefine.errors import NoiseRefineError
from noiserefine.io import OutputFolder
from noiserefine.methods.golden import NPNet, pooled_prompt_embedding
from noiserefine.npnet_pairs import PairSet, load_pairs
from noiserefine.training_loop import LoopSettings, run_training_loop


@dataclass
class NPNetTrainConfig:
    """MSE training on the kept pairs: AdamW, cosine learning-rate decay, batches drawn by
    generators seeded with (seed, step) so a resumed run equals an uninterrupted one. Pairs whose
    score does not beat their source's by `margin` are left out (the paper's s_0 + m < s_0'; None:
    every pair is kept, the paper's ablation "w/o data filtering"). `singular_values` / `residual`
    False train NPNet without that branch (the paper's other two ablations).
    The defaults are the shipped shapes16 NPNet's recipe (weights/shapes16-npnet.md)."""

    steps: int = 800
    batch_size: int = 64
    lr: float = 1e-3
    margin: float | None = 0.01
    val_fraction: float = 0.05
    width: int = 64
    depth: int = 2
    heads: int = 4
    patch: int = 2
    singular_values: bool = True
    residual: bool = True
    seed: int = 0
    checkpoint_every: int = 200

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "width", "depth", "heads", "patch", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise NoiseRefineError(f"NPNet training needs {name} >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise NoiseRefineError(f"learning rate must be > 0, got {self.lr}")
        if not 0 <= self.val_fraction < 1:
            raise NoiseRefineError(f"val_fraction must be in [0, 1), got {self.val_fraction}")


RESULTS = ("checkpoint", "npnet.safetensors", "npnet.json")
"""What an NPNet run folder holds."""


def train_npnet(backbone: Backbone, pairs: Path, out: Path, cfg: NPNetTrainConfig = NPNetTrainConfig(),
                progress: bool = True, overwrite: bool = False) -> Path:
    """Train (or resume) NPNet on a pair folder. Writes `out/npnet.safetensors` + JSON; atomic
    checkpoints under `out/checkpoint` every `checkpoint_every` steps. `overwrite` deletes an
    earlier run in `out` (once the inputs are validated) instead of resuming it."""
    folder = OutputFolder(Path(out), RESULTS, overwrite=overwrite, resume=True).check()
    data = load_pairs(pairs, cfg.margin)
    if not same_model(data.manifest["base"], backbone.fingerprint()):
        raise NoiseRefineError(f"pairs were collected with {data.manifest['base']}, the model here is {backbone.fingerprint()}")
    emb = _prompt_table(backbone, data.prompts)
    train_idx, val_idx = _split(len(data), cfg.val_fraction)
    torch.manual_seed(cfg.seed)
    net = NPNet.for_backbone(backbone, width=cfg.width, depth=cfg.depth, heads=cfg.heads, patch=cfg.patch,
                             singular_values=cfg.singular_values, residual=cfg.residual)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.0)
    out = folder.open()
    settings = LoopSettings(out / "checkpoint", cfg.steps, lr_schedule="cosine", checkpoint_every=cfg.checkpoint_every,
                            config=_comparable(cfg), desc="train npnet", progress=progress, postfix="mse", window=50)
    run = run_training_loop(settings, {"npnet": net}, opt,
                            lambda step: _train_step(net, opt, data, emb, train_idx, cfg, step))
    path = out / "npnet.safetensors"
    net.save(path, backbone.fingerprint(), {
        "training": asdict(cfg), "pairs": str(pairs), "redenoise": _redenoise_summary(data.manifest["spec"]),
        "pairs_collected": data.collected, "pairs_kept": len(data), "final_mse_avg50": float(np.mean(run.losses[-50:])),
        **_validation(net, data, emb, val_idx), "train_seconds_this_run": round(run.seconds, 1)})
    return path


def _train_step(net: NPNet, opt: torch.optim.Optimizer, data: PairSet, emb: torch.Tensor, train_idx: np.ndarray,
                cfg: NPNetTrainConfig, step: int) -> float:
    """One MSE step on a batch drawn by a generator seeded with (seed, step), at the loop's rate."""
    rng = np.random.default_rng([cfg.seed, step])
    idx = torch.from_numpy(train_idx[rng.choice(len(train_idx), size=cfg.batch_size, replace=len(train_idx) < cfg.batch_size)])
    dev = emb.device
    loss = F.mse_loss(net(data.source[idx].to(dev), emb[idx]), data.target[idx].to(dev).float())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


@torch.no_grad()
def _prompt_table(backbone: Backbone, prompts: list[str]) -> torch.Tensor:
    """(N, D) pooled embedding of each pair's own prompt (each distinct prompt encoded once)."""
    unique = sorted(set(prompts))
    table = pooled_prompt_embedding(backbone.encode_prompts(unique))
    return table[torch.tensor([unique.index(p) for p in prompts], device=table.device)]


def _split(n: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """A fixed validation split (every k-th pair), so resumed runs see the same one."""
    every = round(1 / val_fraction) if val_fraction else n + 1
    val = np.arange(every - 1, n, every)
    return np.setdiff1d(np.arange(n), val), val


@torch.no_grad()
def _validation(net: NPNet, data: PairSet, emb: torch.Tensor, val_idx: np.ndarray) -> dict[str, float]:
    """Held-out MSE of NPNet and of the identity (predicting x_T' = x_T)."""
    if len(val_idx) == 0:
        return {}
    idx = torch.from_numpy(val_idx)
    src, tgt = data.source[idx].to(emb.device), data.target[idx].to(emb.device).float()
    return {"val_mse": float(F.mse_loss(net(src, emb[idx]), tgt)), "val_mse_identity": float(F.mse_loss(src.float(), tgt)),
            "val_pairs": len(val_idx)}


def _redenoise_summary(spec: dict[str, Any]) -> dict[str, Any]:
    """The pair spec without its (long) prompt and seed lists."""
    return {k: v for k, v in spec.items() if k not in ("prompts", "seeds")} | {
        "num_prompts": len(spec["prompts"]), "num_seeds": len(spec["seeds"])}


def _comparable(cfg: NPNetTrainConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d.pop("checkpoint_every")
    return d
