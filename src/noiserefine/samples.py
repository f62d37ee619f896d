"""A sample folder (what `noiserefine sample` writes): one PNG per (prompt, seed) plus
`manifest.jsonl`, one JSON row per image (file, prompt, seed and the settings it was made with).

A folder that already holds samples is resumed when every row of its manifest is a row of the
new run (same file, prompt, seed and settings): the images it lists are kept and only the rest are
made. A folder of other settings, prompts or seeds is refused, unless the caller overwrites it (its
old images and manifest are deleted first). The manifest is rewritten after every batch, so a
killed run resumes after its last finished batch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from PIL import Image
from tqdm.auto import tqdm

from noiserefine.backbones.base import Backbone
from noiserefine.errors import NoiseRefineError
from noiserefine.evaluation.folder import MANIFEST, PER_IMAGE_FIELDS
from noiserefine.generation import NoiseMethod, SamplingOptions, generate_latents, progress_notes
from noiserefine.io import OutputFolder, atomic_write_bytes, jsonl_lines
from noiserefine.sampling import to_uint8

RESULTS = (MANIFEST, "*_seed*.png")
"""What a sample run writes (`OutputFolder` results)."""
"""Manifest fields that vary from image to image; the others are the run's settings."""


def sample_rows(prompts: Sequence[str], seeds: Sequence[int], settings: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifest rows of a run, prompt-major: row k is `{k:05d}_seed{seed}.png` (as JSON reads them back)."""
    pairs = [(p, s) for p in prompts for s in seeds]
    return [json.loads(json.dumps({"file": f"{k:05d}_seed{s}.png", "prompt": p, "seed": s, **settings}))
            for k, (p, s) in enumerate(pairs)]


def plan_samples(out: Path, rows: list[dict[str, Any]], overwrite: bool = False) -> tuple[OutputFolder, list[dict[str, Any]]]:
    """The output folder of `rows` (checked, not created) and the rows still to make there.

    Every row the folder's manifest lists must be one of `rows`; its images are then skipped. A
    folder of other settings, prompts or seeds -- or with images but no manifest -- is refused
    unless `overwrite`."""
    if overwrite:
        return OutputFolder(Path(out), RESULTS, overwrite=True).check(), rows
    listed = _listed(Path(out))
    foreign = [row for row in listed if row not in rows]
    if foreign:
        raise NoiseRefineError(f"{out} holds {_difference(foreign[0], rows[0])}; pass --overwrite to replace "
                               "them, or choose another folder")
    done = {row["file"] for row in listed if (Path(out) / row["file"]).is_file()}
    folder = OutputFolder(Path(out), RESULTS, resume=bool(listed)).check()
    return folder, [row for row in rows if row["file"] not in done]


def write_samples(out: Path, backbone: Backbone, method: NoiseMethod, sampling: SamplingOptions,
                  rows: list[dict[str, Any]], todo: list[dict[str, Any]]) -> None:
    """Make the images of the `todo` rows batch by batch; after each batch, write its PNGs and then
    the manifest of every row done so far (in the order of `rows`)."""
    done = {row["file"] for row in rows} - {row["file"] for row in todo}
    bar = tqdm(total=len(rows), initial=len(rows) - len(todo), desc=method.name, unit="img")
    for lo in range(0, len(todo), sampling.batch_size):
        batch = todo[lo: lo + sampling.batch_size]
        with progress_notes(bar):  # the sampler's step, a search method's round
            latents = generate_latents(backbone, [r["prompt"] for r in batch], [r["seed"] for r in batch], method,
                                       sampling)
        for row, image in zip(batch, to_uint8(backbone.decode(latents))):
            Image.fromarray(image).save(out / row["file"])
        done |= {row["file"] for row in batch}
        atomic_write_bytes(out / MANIFEST, "".join(json.dumps(r) + "\n" for r in rows if r["file"] in done).encode())
        bar.update(len(batch))
    bar.close()


def _listed(folder: Path) -> list[dict[str, Any]]:
    """The rows of `folder`'s manifest ([] without one)."""
    path = folder / MANIFEST
    if not path.is_file():
        return []
    rows = []
    for number, row in jsonl_lines(path):
        if not isinstance(row, dict):
            raise NoiseRefineError(f"{path} line {number} is not a manifest row; pass --overwrite to replace "
                                   "the folder's samples, or choose another folder")
        rows.append(row)
    return rows


def _difference(found: dict[str, Any], planned: dict[str, Any]) -> str:
    """What a folder's row has that this run's do not: other settings (named), or other images."""
    keys = sorted((set(found) | set(planned)) - set(PER_IMAGE_FIELDS), key=lambda k: (k not in planned, k))
    changed = [f"{k} {found.get(k)!r}, not {planned.get(k)!r}" for k in keys if found.get(k) != planned.get(k)]
    if changed:
        return f"samples made with other settings ({'; '.join(changed[:4])})"
    return f"samples of other prompts or seeds ({found.get('file')}: {found.get('prompt')!r}, seed {found.get('seed')})"
