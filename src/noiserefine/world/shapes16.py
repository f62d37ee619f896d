"""shapes16: one colored shape on a 16 x 16 canvas, described by a 6-word prompt.

The definition is fixed by docs/world.md sections 1-3 (colors, anchors, jitter, sizes, shape tests);
images are built in [0, 1] and returned as 2 * value - 1, in [-1, 1], shape (3, 16, 16). A world
variant (docs/world.md section 3, "Variants") repaints the same scenes: another background and
palette, the same prompts, shapes, positions and random draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from typing import Sequence

import numpy as np

from noiserefine.errors import NoiseRefineError

IMAGE_SIZE = 16
BACKGROUND = 0.15
JITTER = 0.06
SIZE_RANGE = (0.16, 0.22)

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.1, 0.1),
    "green": (0.1, 0.9, 0.1),
    "blue": (0.15, 0.3, 1.0),
    "yellow": (1.0, 0.9, 0.1),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.3, 0.5),
    "right": (0.7, 0.5),
    "top": (0.5, 0.3),
    "bottom": (0.5, 0.7),
}


@dataclass(frozen=True)
class Palette:
    """How a world variant paints a scene: the background and the RGB each colour word names."""

    background: tuple[float, float, float]
    colors: dict[str, tuple[float, float, float]]


# "shifted" is the domain a fine-tuned base is trained on (the transfer test of the NoiseRefine
# paper's Tab. 4): a dark brown background and a pastel palette, which both judges still read
# (>= 0.99 adherence on renders; tests/test_report_transfer.py).
WORLD_VARIANTS: dict[str, Palette] = {
    "original": Palette((BACKGROUND,) * 3, COLORS),
    "shifted": Palette((0.12, 0.08, 0.04), {
        "red": (0.95, 0.3, 0.35),
        "green": (0.3, 0.85, 0.35),
        "blue": (0.3, 0.45, 0.95),
        "yellow": (0.95, 0.85, 0.35),
    }),
}


def world_palette(variant: str) -> Palette:
    """The palette of a world variant ("original" or "shifted")."""
    if variant not in WORLD_VARIANTS:
        raise NoiseRefineError(f"unknown world variant {variant!r}; choose from {', '.join(WORLD_VARIANTS)}")
    return WORLD_VARIANTS[variant]


@dataclass(frozen=True)
class Prompt:
    """A parsed shapes16 prompt: the three attributes a judge checks."""

    color: str
    shape: str
    position: str

    @property
    def text(self) -> str:
        return f"a {self.color} {self.shape} on the {self.position}"


ALL_PROMPTS: tuple[str, ...] = tuple(
    Prompt(c, s, p).text for c, s, p in product(COLORS, SHAPES, POSITIONS)
)


def parse_prompt(text: str) -> Prompt | None:
    """Parse `a <color> <shape> on the <position>`; the empty prompt (CFG's unconditional) is None.

    Unknown words are an error, never dropped: the grammar is the model's whole vocabulary.
    """
    words = text.strip().lower().split()
    if not words:
        return None
    known = {"a", "on", "the", *COLORS, *SHAPES, *POSITIONS}
    unknown = [w for w in words if w not in known]
    if unknown:
        raise NoiseRefineError(
            f"unknown word(s) {unknown} in prompt {text!r}; shapes16 knows colors {list(COLORS)}, "
            f"shapes {list(SHAPES)}, positions {list(POSITIONS)}"
        )
    ok = (
        len(words) == 6
        and words[0] == "a"
        and words[1] in COLORS
        and words[2] in SHAPES
        and words[3:5] == ["on", "the"]
        and words[5] in POSITIONS
    )
    if not ok:
        raise NoiseRefineError(
            f"prompt {text!r} does not follow 'a <color> <shape> on the <position>'"
        )
    return Prompt(words[1], words[2], words[5])


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, cx, cy, r) -> np.ndarray:
    if shape == "circle":
        return (u - cx) ** 2 + (v - cy) ** 2 < r**2
    if shape == "square":
        return (np.abs(u - cx) < 0.85 * r) & (np.abs(v - cy) < 0.85 * r)
    if shape == "triangle":  # apex up
        return (cy - r < v) & (v < cy + 0.8 * r) & (np.abs(u - cx) < 0.6 * (v - (cy - r)))
    raise NoiseRefineError(f"unknown shape {shape!r}")


def render(prompts: Sequence[Prompt], rng: np.random.Generator, variant: str = "original") -> np.ndarray:
    """Render one image per prompt; returns float32 (B, 3, 16, 16) in [-1, 1].

    Jitter and size are drawn from `rng` in prompt order (cx, cy, r for each image), so a variant
    (`WORLD_VARIANTS`) paints the same shapes at the same places as the original world.
    """
    palette = world_palette(variant)
    n = len(prompts)
    grid = np.arange(IMAGE_SIZE) / (IMAGE_SIZE - 1)
    u, v = np.meshgrid(grid, grid)  # u = j / 15 (columns), v = i / 15 (rows, downwards)
    draws = rng.uniform(size=(n, 3))
    images = np.empty((n, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    images[:] = np.asarray(palette.background, dtype=np.float32)[:, None, None]
    for k, p in enumerate(prompts):
        ax, ay = POSITIONS[p.position]
        cx = ax + (2 * draws[k, 0] - 1) * JITTER
        cy = ay + (2 * draws[k, 1] - 1) * JITTER
        r = SIZE_RANGE[0] + draws[k, 2] * (SIZE_RANGE[1] - SIZE_RANGE[0])
        mask = _shape_mask(p.shape, u, v, cx, cy, r)
        images[k][:, mask] = np.asarray(palette.colors[p.color], dtype=np.float32)[:, None]
    return 2.0 * images - 1.0


def random_prompts(n: int, rng: np.random.Generator) -> list[Prompt]:
    """Prompts drawn uniformly from the 48."""
    idx = rng.integers(0, len(ALL_PROMPTS), size=n)
    return [parse_prompt(ALL_PROMPTS[i]) for i in idx]
