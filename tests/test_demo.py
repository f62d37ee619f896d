"""The demo's picture: columns titled with their model evaluations, one framed tile per prompt and
seed, written as a PNG."""

from __future__ import annotations

import numpy as np
from PIL import Image

from noiserefine.api import load_refiner
from noiserefine.demo import GRID_PROMPTS, GRID_SEEDS, _draw, grid_columns
from noiserefine.guidance import Teacher
from noiserefine.world.shapes16 import parse_prompt


def test_grid_prompts_cover_every_attribute_value():
    parsed = [parse_prompt(p) for p in GRID_PROMPTS]
    assert len({p.color for p in parsed}) == 4 and len({p.shape for p in parsed}) == 3
    assert len({p.position for p in parsed}) == 4


def test_columns_are_gaussian_teacher_refined_with_their_costs():
    refiner = load_refiner()
    teacher = Teacher.from_record(refiner.config.teacher)
    columns = grid_columns(refiner)
    assert [c.method.name for c in columns] == ["gaussian", "gaussian", "refined"]
    assert columns[1].sampling.guidance == teacher.guidance and not columns[0].sampling.guidance.is_guided
    nfe = teacher.guidance.nfe(teacher.steps)
    assert [c.title.splitlines()[1] for c in columns] == [
        f"{teacher.steps} model evaluations", f"{nfe} model evaluations", f"{teacher.steps + 1} model evaluations"]


def test_draw_writes_a_png(tmp_path):
    n = len(GRID_PROMPTS) * len(GRID_SEEDS)
    tiles = [np.full((n, 16, 16, 3), 40 * c, dtype=np.uint8) for c in range(3)]
    right = [[i % 2 == 0 for i in range(n)]] * 3
    path = _draw(tmp_path / "grid.png", grid_columns(load_refiner()), tiles, right)
    with Image.open(path) as img:
        assert img.size[0] > 800 and img.size[1] > 600
