"""Exporting real shapes16 renders as PNG files with a `labels.jsonl` beside them.

Image k is drawn from its own generator `np.random.default_rng([seed, k])` (prompt, then jitter
and size), so it does not depend on `n`: a larger export begins with the smaller one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from noiserefine.errors import NoiseRefineError
from noiserefine.io import OutputFolder, atomic_write_bytes
from noiserefine.world.shapes16 import random_prompts, render

LABELS = "labels.jsonl"
RESULTS = (LABELS, "[0-9]*.png")
"""What an export writes (`OutputFolder` results): the labels and the numbered renders."""


def save_png(path: Path, image: np.ndarray) -> None:
    """Write one (3, H, W) image in [-1, 1] as an 8-bit RGB PNG (values outside are clipped)."""
    pixels = np.rint((np.clip(image, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    Image.fromarray(pixels.transpose(1, 2, 0)).save(path)


def export_world(out: Path, n: int, seed: int, overwrite: bool = False) -> Path:
    """Write `n` >= 1 real renders as `out/{k:05d}.png` plus `out/labels.jsonl` (file, prompt, color,
    shape, position, seed, index); deterministic for a given seed >= 0. A folder holding an export
    is refused unless `overwrite` (which deletes the old one first). Returns `out`."""
    folder = OutputFolder(Path(out), RESULTS, overwrite=overwrite).check()
    if n < 1 or seed < 0:
        raise NoiseRefineError(f"world export needs n >= 1 renders and a seed >= 0, got n={n}, seed={seed}")
    out = folder.open()
    rows = []
    for k in range(n):
        rng = np.random.default_rng([seed, k])
        prompt = random_prompts(1, rng)[0]
        name = f"{k:05d}.png"
        save_png(out / name, render([prompt], rng)[0])
        rows.append({"file": name, "prompt": prompt.text, "color": prompt.color, "shape": prompt.shape,
                     "position": prompt.position, "seed": seed, "index": k})
    atomic_write_bytes(out / LABELS, "".join(json.dumps(r) + "\n" for r in rows).encode())
    return out
