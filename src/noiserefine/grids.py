"""Labelled PNG grids of images: a title, column headers, row labels and a caption under each tile.

    write_grid(path, [[a, b], [c, d]], title="step 100", columns=["Gaussian", "refined"],
               rows=["a cat", "a dog"])

Tiles are (H, W, 3) uint8 arrays, shown at `tile_px` (bicubic; nearest for tiles of half that size or
less, so small images stay sharp); a missing tile (None) is left blank.
Used by the real-model bench (a grid per row) and by training's validation images.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from noiserefine.errors import NoiseRefineError

PAD = 8
FONT_PX = 14


def write_grid(path: Path, tiles: Sequence[Sequence[np.ndarray | None]], *, title: str,
               columns: Sequence[str] = (), rows: Sequence[str] = (),
               captions: Sequence[Sequence[str]] | None = None, tile_px: int = 256) -> Path:
    """Draw `tiles` (rows of tiles) with their labels into the PNG `path`; returns `path`."""
    n_cols = max((len(r) for r in tiles), default=0)
    if not tiles or not n_cols:
        raise NoiseRefineError("a grid needs at least one tile")
    if (columns and len(columns) != n_cols) or (rows and len(rows) != len(tiles)):
        raise NoiseRefineError(f"grid labels do not fit: {len(columns)} column and {len(rows)} row labels for "
                               f"{len(tiles)} x {n_cols} tiles")
    font = ImageFont.load_default(size=FONT_PX)
    line = FONT_PX + 4
    label_w = 220 if rows else 0
    caption_h = 2 * line if captions else 0
    head_h = (len(_wrap(title, font, n_cols * (tile_px + PAD) + label_w)) + 1) * line + (2 * line if columns else 0)
    width = label_w + n_cols * (tile_px + PAD) + PAD
    height = head_h + len(tiles) * (tile_px + caption_h + PAD) + PAD
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    _text(draw, (PAD, PAD), title, font, width - 2 * PAD, lines=99)
    for c, name in enumerate(columns):
        _text(draw, (label_w + PAD + c * (tile_px + PAD), head_h - 2 * line), name, font, tile_px, lines=2)
    for r, row in enumerate(tiles):
        y = head_h + r * (tile_px + caption_h + PAD)
        if rows:
            _text(draw, (PAD, y + PAD), rows[r], font, label_w - 2 * PAD, lines=tile_px // line)
        for c, tile in enumerate(row):
            x = label_w + PAD + c * (tile_px + PAD)
            if tile is not None:
                canvas.paste(_fit(tile, tile_px), (x, y))
            if captions and captions[r][c]:
                _text(draw, (x, y + tile_px + 2), captions[r][c], font, tile_px, lines=2)
    path = Path(path)
    canvas.save(path)
    return path


def _fit(tile: np.ndarray, px: int) -> Image.Image:
    """A tile at `px` pixels: small images enlarged pixel by pixel (nearest), others bicubic."""
    small = max(tile.shape[:2]) * 2 <= px
    return Image.fromarray(tile).resize((px, px), Image.Resampling.NEAREST if small else Image.Resampling.BICUBIC)


def _wrap(text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    chars = max(8, int(width / max(font.getlength("n"), 1)))
    return [part for para in text.splitlines() for part in (textwrap.wrap(para, chars) or [""])]


def _text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, font: ImageFont.ImageFont, width: int,
          lines: int) -> None:
    """`text` wrapped to `width` pixels, at most `lines` lines (the last one cut with '...')."""
    wrapped = _wrap(text, font, width)
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] = wrapped[-1][:-3] + "..."
    draw.multiline_text(xy, "\n".join(wrapped), fill="black", font=font, spacing=4)
