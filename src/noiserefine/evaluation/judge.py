"""The shapes16 judge: a classifier of color, shape and position that grades generated images.

It plays the roles that CLIP/VQA scorers and Inception features play for real text-to-image
models (docs/world.md sections 5-6): prompt adherence (all three attributes right), a differentiable
prompt probability (the scorer Noise Diffusion optimises, its Eq. for s(x_0, c)), and the feature
vector for the Frechet distance. Two architectures exist so that a method optimised against the
"primary" judge can still be graded by a "heldout" judge it never saw.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from noiserefine.errors import NoiseRefineError
from noiserefine.io import ensure_out_dir, load_tensors, save_tensors, shipped_path, write_json
from noiserefine.training_loop import LoopSettings, run_training_loop
from noiserefine.world.shapes16 import (
    COLORS, IMAGE_SIZE, POSITIONS, SHAPES, Prompt, parse_prompt, random_prompts, render,
)

ATTRIBUTES: dict[str, tuple[str, ...]] = {"color": tuple(COLORS), "shape": SHAPES, "position": tuple(POSITIONS)}
BATCH_SIZE = 128
LEARNING_RATE = 2e-3
MAX_NOISE_STD = 0.2  # augmentation: generated images are slightly noisy, renders are not
EVAL_SIZE = 2000
CHECKPOINT_EVERY = 500  # steps between the training checkpoints (a killed training resumes)
_TRAIN_STREAM, _EVAL_STREAM = 0, 1  # disjoint generator streams for training and held-out renders


def _primary_trunk() -> tuple[nn.Module, int]:
    """Small CNN: 3x3 convs (16, 32, 64 channels, two stride 2) -> 4x4x64 -> 64-d features.

    SiLU rather than ReLU: dead ReLU units would leave the FD covariance singular."""
    trunk = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.SiLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.SiLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),
        nn.Flatten(), nn.Linear(64 * 4 * 4, 64), nn.SiLU(),
    )
    return trunk, 64


def _heldout_trunk() -> tuple[nn.Module, int]:
    """A different inductive bias: 5x5 convs with max-pooling, GELU, 96-d features."""
    trunk = nn.Sequential(
        nn.Conv2d(3, 24, 5, padding=2), nn.GELU(), nn.MaxPool2d(2),
        nn.Conv2d(24, 48, 5, padding=2), nn.GELU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(48 * 4 * 4, 96), nn.GELU(),
    )
    return trunk, 96


ARCHITECTURES: dict[str, Callable[[], tuple[nn.Module, int]]] = {
    "primary": _primary_trunk,
    "heldout": _heldout_trunk,
}


def _check_kind(kind: str) -> None:
    if kind not in ARCHITECTURES:
        raise NoiseRefineError(f"unknown judge kind {kind!r}; expected one of {list(ARCHITECTURES)}")


def _parse_all(prompts: Sequence[str]) -> list[Prompt]:
    parsed = [parse_prompt(p) for p in prompts]
    if any(p is None for p in parsed):
        raise NoiseRefineError("the judge scores prompts naming all three attributes; got the empty prompt")
    return parsed


def attribute_labels(prompts: Sequence[Prompt], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Class indices (B,) per attribute, in the order of `ATTRIBUTES`."""
    return {
        name: torch.tensor([words.index(getattr(p, name)) for p in prompts], dtype=torch.long, device=device)
        for name, words in ATTRIBUTES.items()
    }


class Judge(nn.Module):
    """Feature trunk + one linear head per attribute. Input: (B, 3, 16, 16) images in [-1, 1]."""

    def __init__(self, kind: str = "primary") -> None:
        super().__init__()
        _check_kind(kind)
        self.kind = kind
        self.trunk, self.feature_dim = ARCHITECTURES[kind]()
        self.heads = nn.ModuleDict(
            {name: nn.Linear(self.feature_dim, len(words)) for name, words in ATTRIBUTES.items()}
        )

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D) feature vectors (the space the Frechet distance is measured in)."""
        expected = (3, IMAGE_SIZE, IMAGE_SIZE)
        if not torch.is_tensor(images) or images.ndim != 4 or tuple(images.shape[1:]) != expected:
            got = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise NoiseRefineError(f"the judge expects images of shape (B, 3, 16, 16) in [-1, 1], got {got}")
        return self.trunk(images)

    def logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unnormalised class scores per attribute: {"color": (B, 4), "shape": (B, 3), "position": (B, 4)}."""
        feats = self.features(images)
        return {name: head(feats) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, list[str]]:
        """The most likely word per attribute for each image."""
        logits = self.logits(images)
        return {name: [ATTRIBUTES[name][i] for i in lg.argmax(-1).tolist()] for name, lg in logits.items()}

    def prompt_probability(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """(B,) product over attributes of p(attribute named by the prompt | image).

        Differentiable w.r.t. `images` (gradient mode is the caller's): the VQA-score-like s(x_0, c)
        that Noise Diffusion maximises.
        """
        if len(prompts) != images.shape[0]:
            raise NoiseRefineError(f"got {images.shape[0]} images but {len(prompts)} prompts")
        targets = attribute_labels(_parse_all(prompts), images.device)
        logits = self.logits(images)
        log_p = sum(
            F.log_softmax(logits[name], -1).gather(1, targets[name][:, None]).squeeze(1) for name in ATTRIBUTES
        )
        return log_p.exp()


@torch.no_grad()
def attribute_accuracy(judge: Judge, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, float]:
    """Fraction right per attribute and `adherence` (all three right) against the prompts."""
    if len(prompts) != images.shape[0]:
        raise NoiseRefineError(f"got {images.shape[0]} images but {len(prompts)} prompts")
    targets = attribute_labels(_parse_all(prompts), images.device)
    right = {name: lg.argmax(-1) == targets[name] for name, lg in judge.logits(images).items()}
    all_right = torch.stack(list(right.values())).all(0)
    n = len(prompts)
    per_attribute = {f"acc_{name}": r.sum().item() / n for name, r in right.items()}
    return {"adherence": all_right.sum().item() / n, **per_attribute}


def _noisy_batch(seed: int, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Fresh uniform-prompt renders plus Gaussian pixel noise of per-image std ~ U(0, 0.2)."""
    rng = np.random.default_rng([seed, _TRAIN_STREAM, step])
    prompts = random_prompts(BATCH_SIZE, rng)
    images = render(prompts, rng)
    std = rng.uniform(0, MAX_NOISE_STD, size=(BATCH_SIZE, 1, 1, 1))
    images = images + std * rng.standard_normal(images.shape)
    return torch.from_numpy(images.astype(np.float32)), attribute_labels(prompts)


def _heldout_accuracy(judge: Judge, seed: int) -> dict[str, float]:
    rng = np.random.default_rng([seed, _EVAL_STREAM])
    prompts = random_prompts(EVAL_SIZE, rng)
    images = torch.from_numpy(render(prompts, rng))
    return attribute_accuracy(judge, images, [p.text for p in prompts])


def train_judge(kind: str, seed: int, steps: int, out: Path, progress: bool = False) -> Path:
    """Train (or resume) a judge on fresh renders; writes `out/judge-{kind}.safetensors` and a JSON
    config beside it, atomic checkpoints under `out/judge-{kind}-checkpoint`.

    Args:
        kind: "primary" or "heldout" (architecture).
        seed: initialisation and data seed.
        steps: optimiser steps of batch 128 (AdamW, cosine decay to 0 over `steps`).
        out: output folder (its parent must exist).
        progress: show a progress bar.
    Returns:
        The path of the safetensors file.
    """
    _check_kind(kind)
    loop = LoopSettings(Path(out) / f"judge-{kind}-checkpoint", steps, lr_schedule="cosine",
                        checkpoint_every=CHECKPOINT_EVERY, desc=f"judge-{kind}", progress=progress,
                        config={"kind": kind, "seed": seed, "batch_size": BATCH_SIZE, "lr": LEARNING_RATE,
                                "max_noise_std": MAX_NOISE_STD})
    out = ensure_out_dir(out)
    torch.manual_seed(seed)
    judge = Judge(kind)
    opt = torch.optim.AdamW(judge.parameters(), lr=LEARNING_RATE)
    run_training_loop(loop, {"judge": judge}, opt, lambda step: _judge_step(judge, opt, seed, step))
    judge.eval()
    path = out / f"judge-{kind}.safetensors"
    save_tensors(path, judge.state_dict())
    write_json(path.with_suffix(".json"), {
        "architecture": f"shapes16-judge-{kind}", "kind": kind, "feature_dim": judge.feature_dim,
        "seed": seed, "steps": steps, "batch_size": BATCH_SIZE, "lr": LEARNING_RATE,
        "max_noise_std": MAX_NOISE_STD, "heldout_accuracy": _heldout_accuracy(judge, seed),
        "heldout_size": EVAL_SIZE,
    })
    return path


def _judge_step(judge: Judge, opt: torch.optim.Optimizer, seed: int, step: int) -> float:
    """One step of summed cross-entropy over the attributes on the renders of `step`."""
    images, labels = _noisy_batch(seed, step)
    logits = judge.logits(images)
    loss = sum(F.cross_entropy(logits[name], labels[name]) for name in ATTRIBUTES)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def load_judge(kind: str = "primary", path: Path | None = None) -> Judge:
    """Load a judge (the shipped `weights/judge-{kind}.safetensors` when `path` is None), in eval
    mode with frozen weights; gradients still flow to the input images."""
    _check_kind(kind)
    if path is None:
        path = shipped_path(f"judge-{kind}.safetensors")
    judge = Judge(kind)
    try:
        judge.load_state_dict(load_tensors(Path(path)))
    except RuntimeError as err:
        raise NoiseRefineError(f"{path} is not a {kind!r} judge ({str(err).splitlines()[0]})") from None
    return judge.eval().requires_grad_(False)


def load_judges() -> dict[str, Judge]:
    """Both shipped judges, keyed as `score_images` expects: {"primary": ..., "heldout": ...}."""
    return {kind: load_judge(kind) for kind in ARCHITECTURES}
