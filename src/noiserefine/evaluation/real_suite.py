"""How the bench evaluates a real model's rows (`bench --model`): the mean of every real-image
scorer whose local model is given (CLIP score, aesthetic, PickScore, HPSv2, ImageReward:
`noiserefine.evaluation.scorers`), the Fréchet distance to a reference image folder under a named
feature model (`noiserefine.evaluation.reference`), and each row's images (PNG + manifest.jsonl)
with a labelled grid, saved into the bench folder.

    BENCH/images/<row>/00000.png ...   every image of the row, as sampled
    BENCH/images/<row>/manifest.jsonl  file, prompt, seed of each
    BENCH/grids/<row>.png              the row's first GRID_IMAGES images, captioned with seed and prompt
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from noiserefine.backbones.base import Backbone
from noiserefine.evaluation.reference import ReferenceFD, reference_files
from noiserefine.evaluation.scorers import REGISTRY, ScorerModels, row_score, row_scorers
from noiserefine.grids import write_grid
from noiserefine.io import atomic_write_bytes
from noiserefine.sampling import to_uint8

SAVED = ("images", "grids")
"""What a real-model bench saves besides its table (`OutputFolder` results)."""
GRID_IMAGES, GRID_COLUMNS = 16, 4


@dataclass(frozen=True)
class RealEvaluation:
    """What a real-model bench measures besides cost: scorers from local models, FD to `reference`
    (a folder of images) under the feature model `fd_model` (Inception-v3 weights or a CLIP folder;
    default: the CLIP folder of `models.clip_model`)."""

    models: ScorerModels = ScorerModels()
    reference: Path | None = None
    fd_model: Path | None = None

    def check(self) -> None:
        """Fail on a bad reference folder before any row runs (models fail when they load)."""
        if self.reference is not None:
            reference_files(self.reference)


class RealRowScore:
    """A row's figures: each given scorer's row score under its bench.json key, and `fd`; `meta`
    names the FD feature model and the size of the reference set for the table."""

    def __init__(self, backbone: Backbone, evaluation: RealEvaluation) -> None:
        self.scorers = row_scorers(evaluation.models, backbone.device)
        features = evaluation.fd_model or evaluation.models.clip_model
        self.fd = ReferenceFD(evaluation.reference, features, backbone.device) \
            if evaluation.reference is not None else None
        self.meta = self.fd.record() if self.fd is not None else {}

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
        out = {key: row_score(scorer, images, prompts) for (key, _), scorer in self.scorers.items()}
        return out | ({"fd": self.fd(images)} if self.fd is not None else {})


def metric_columns(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(bench.json key, table header, number format) of the figures the rows carry, registry order, FD last."""
    columns = [(key, label, "{:.3f}" if key in ("hpsv2", "imagereward") else "{:.2f}")
               for key, label in (e.column for e in REGISTRY.values() if e.column)]
    if "fd_features" in meta:
        columns.append(("fd", f"{meta['fd_features']} to {meta['reference_images']} reference images", "{:.2f}"))
    return [c for c in columns if any(c[0] in r for r in rows)]


def save_row(out: Path, label: str, images: torch.Tensor, prompts: Sequence[str], seeds: Sequence[int]) -> Path:
    """Write a row's images, their manifest and its labelled grid under `out`; returns the grid path."""
    slug = re.sub(r"[^A-Za-z0-9.+=-]+", "_", label).strip("_")
    folder = out / "images" / slug
    folder.mkdir(parents=True, exist_ok=True)
    arrays = to_uint8(images)
    lines = []
    for i, (array, prompt, seed) in enumerate(zip(arrays, prompts, seeds)):
        name = f"{i:05d}.png"
        Image.fromarray(array).save(folder / name)
        lines.append(json.dumps({"file": name, "prompt": prompt, "seed": seed, "row": label}))
    atomic_write_bytes(folder / "manifest.jsonl", ("\n".join(lines) + "\n").encode())
    (out / "grids").mkdir(exist_ok=True)
    k = min(GRID_IMAGES, len(arrays))
    cells = [list(range(lo, min(lo + GRID_COLUMNS, k))) for lo in range(0, k, GRID_COLUMNS)]
    return write_grid(out / "grids" / f"{slug}.png", [[arrays[i] for i in row] for row in cells],
                      title=f"{label}: the first {k} of {len(arrays)} images (bench prompts and seeds, in order)",
                      captions=[[f"seed {seeds[i]}: {prompts[i]}" for i in row] for row in cells])
