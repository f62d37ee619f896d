"""Scoring a folder of generated PNGs described by `manifest.jsonl` (one JSON object per image).

Each manifest row names at least `file` (relative to the folder), `prompt`, `seed`, `method`,
`cfg`, `pag` and `steps`; rows are grouped by (method, cfg, pag, steps) and each group is scored
with `score_images` by both shipped judges.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from noiserefine.errors import NoiseRefineError
from noiserefine.evaluation.judge import load_judges
from noiserefine.evaluation.metrics import score_images
from noiserefine.world.shapes16 import IMAGE_SIZE, parse_prompt

MANIFEST = "manifest.jsonl"
REQUIRED_FIELDS = ("file", "prompt", "seed", "method", "cfg", "pag", "steps")
GROUP_FIELDS = ("method", "cfg", "pag", "steps")


def read_manifest(folder: Path) -> list[dict[str, Any]]:
    """Rows of `folder/manifest.jsonl` (blank lines skipped), each checked for the required fields
    and a valid prompt."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NoiseRefineError(f"image folder not found: {folder}")
    path = folder / MANIFEST
    if not path.is_file():
        raise NoiseRefineError(f"{MANIFEST} not found in {folder}")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise NoiseRefineError(f"{path} line {number} is not valid JSON ({err.msg})") from None
        missing = [f for f in REQUIRED_FIELDS if not isinstance(row, dict) or f not in row]
        if missing:
            raise NoiseRefineError(f"{path} line {number} lacks field(s) {missing}")
        parse_prompt(row["prompt"])
        rows.append(row)
    if not rows:
        raise NoiseRefineError(f"{path} lists no images")
    return rows


def load_png(path: Path) -> np.ndarray:
    """An RGB 16 x 16 PNG as float32 (3, 16, 16) in [-1, 1]."""
    path = Path(path)
    if not path.is_file():
        raise NoiseRefineError(f"image file not found: {path}")
    with Image.open(path) as img:
        if img.size != (IMAGE_SIZE, IMAGE_SIZE) or img.mode != "RGB":
            got = f"{img.size[0]}x{img.size[1]} {img.mode}"
            raise NoiseRefineError(f"{path}: expected a {IMAGE_SIZE}x{IMAGE_SIZE} RGB image, got {got}")
        pixels = np.asarray(img, dtype=np.float32)
    return (pixels / 255.0 * 2.0 - 1.0).transpose(2, 0, 1)


def evaluate_folder(folder: Path) -> dict[str, Any]:
    """Score every (method, cfg, pag, steps) group of a manifest folder.

    Returns:
        {"folder": str, "n_images": int, "groups": [{"method", "cfg", "pag", "steps", "count",
        **score_images(...)}, ...]} with groups in order of first appearance.
    """
    folder = Path(folder)
    rows = read_manifest(folder)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(json.dumps(row[f]) for f in GROUP_FIELDS), []).append(row)
    judges = load_judges()
    results = []
    for members in groups.values():
        group = {f: members[0][f] for f in GROUP_FIELDS}
        if len(members) < 2:
            raise NoiseRefineError(f"group {group} has 1 image; the Frechet distance needs at least 2")
        images = torch.from_numpy(np.stack([load_png(folder / row["file"]) for row in members]))
        scores = score_images(images, [row["prompt"] for row in members], judges)
        results.append({**group, "count": len(members), **scores})
    return {"folder": str(folder), "n_images": len(rows), "groups": results}
