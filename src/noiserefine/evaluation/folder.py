"""Scoring a folder of generated PNGs described by `manifest.jsonl` (one JSON object per image).

Each manifest row names at least `file` (relative to the folder), `prompt`, `seed`, `method` and
`steps`, and its guidance as `Guidance.to_record` writes it (absent fields: unguided defaults);
rows are grouped by method, method options, guidance and steps, and each group is scored with
`score_images` by both shipped judges.
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
from noiserefine.guidance import Guidance
from noiserefine.io import jsonl_lines
from noiserefine.world.shapes16 import IMAGE_SIZE, parse_prompt

MANIFEST = "manifest.jsonl"
REQUIRED_FIELDS = ("file", "prompt", "seed", "method", "steps")
PER_IMAGE_FIELDS = ("file", "prompt", "seed")


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
    for number, row in jsonl_lines(path):
        if isinstance(row, json.JSONDecodeError):
            raise NoiseRefineError(f"{path} line {number} is not valid JSON ({row.msg})")
        missing = [f for f in REQUIRED_FIELDS if not isinstance(row, dict) or f not in row]
        if missing:
            raise NoiseRefineError(f"{path} line {number} lacks field(s) {missing}")
        _check_row(row, f"{path} line {number}")
        rows.append(row)
    if not rows:
        raise NoiseRefineError(f"{path} lists no images")
    return rows


def _check_row(row: dict[str, Any], where: str) -> None:
    """A row's file and prompt are text, the prompt a shapes16 prompt, its guidance record valid."""
    if not isinstance(row["file"], str) or not isinstance(row["prompt"], str):
        raise NoiseRefineError(f"{where}: file and prompt must be text, got {row['file']!r} and {row['prompt']!r}")
    parse_prompt(row["prompt"])
    try:
        Guidance.from_record(row)
    except (TypeError, ValueError) as err:
        raise NoiseRefineError(f"{where} has a bad guidance record ({err})") from None


def load_png(path: Path) -> np.ndarray:
    """An RGB 16 x 16 PNG as float32 (3, 16, 16) in [-1, 1]."""
    path = Path(path)
    if not path.is_file():
        raise NoiseRefineError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            if img.size != (IMAGE_SIZE, IMAGE_SIZE) or img.mode != "RGB":
                got = f"{img.size[0]}x{img.size[1]} {img.mode}"
                raise NoiseRefineError(f"{path}: expected a {IMAGE_SIZE}x{IMAGE_SIZE} RGB image, got {got}")
            pixels = np.asarray(img, dtype=np.float32)
    except (OSError, SyntaxError) as err:  # PIL: not an image (OSError), truncated or broken PNG (both)
        raise NoiseRefineError(f"{path} is not a readable image ({err})") from None
    return (pixels / 255.0 * 2.0 - 1.0).transpose(2, 0, 1)


def evaluate_folder(folder: Path) -> dict[str, Any]:
    """Score every group of a manifest folder (same method, options, guidance and steps).

    Returns:
        {"folder": str, "n_images": int, "groups": [{"method", its options, the guidance record,
        "steps", ..., "count", **score_images(...)}, ...]} with groups in order of first appearance.
    """
    folder = Path(folder)
    rows = read_manifest(folder)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(json.dumps(_settings(row), sort_keys=True), []).append(row)
    judges = load_judges()
    results = []
    for members in groups.values():
        group = _settings(members[0])
        if len(members) < 2:
            raise NoiseRefineError(f"group {group} has 1 image; the Frechet distance needs at least 2")
        images = torch.from_numpy(np.stack([load_png(folder / row["file"]) for row in members]))
        scores = score_images(images, [row["prompt"] for row in members], judges)
        results.append({**group, "count": len(members), **scores})
    return {"folder": str(folder), "n_images": len(rows), "groups": results}


def _settings(row: dict[str, Any]) -> dict[str, Any]:
    """What a row's image was made with: every field but the per-image ones, its guidance in full."""
    settings = {k: v for k, v in row.items() if k not in PER_IMAGE_FIELDS}
    return settings | Guidance.from_record(row).to_record()
