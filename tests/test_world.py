"""The shapes16 world (docs/world.md, sections 1-3 and the check values of section 7) and its PNG export."""

import json

import numpy as np
import pytest

from noiserefine.errors import NoiseRefineError
from noiserefine.evaluation.folder import load_png
from noiserefine.world.export import export_world
from noiserefine.world.shapes16 import ALL_PROMPTS, BACKGROUND, parse_prompt, random_prompts, render

RED = (1.0, -0.8, -0.8)  # (1.0, 0.1, 0.1) stored as 2 * value - 1


def _painted(image: np.ndarray, color: tuple[float, float, float]) -> np.ndarray:
    """(16, 16) mask of pixels equal to `color`."""
    return np.all(np.isclose(image, np.asarray(color, dtype=np.float32)[:, None, None]), axis=0)


def test_render_is_deterministic_for_a_seed():
    def draw(seed):
        rng = np.random.default_rng(seed)
        return render(random_prompts(8, rng), rng)

    np.testing.assert_array_equal(draw(3), draw(3))
    assert not np.array_equal(draw(3), draw(4))


def test_render_range_shape_and_background():
    rng = np.random.default_rng(0)
    images = render(random_prompts(16, rng), rng)
    assert images.shape == (16, 3, 16, 16) and images.dtype == np.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    # the corners are never reached by a shape
    np.testing.assert_allclose(images[:, :, [0, 0, -1, -1], [0, -1, 0, -1]], 2 * BACKGROUND - 1, atol=1e-6)
    assert np.isclose(2 * BACKGROUND - 1, -0.7)


def test_pixel_coordinates_left_is_columns_top_is_rows():
    rng = np.random.default_rng(0)
    left = render([parse_prompt("a red circle on the left")] * 20, rng)
    top = render([parse_prompt("a red square on the top")] * 20, rng)
    for image in left:
        rows, cols = np.nonzero(_painted(image, RED))
        assert len(cols) > 5
        # u = j / 15: the shape sits left of the center column and never reaches the far right
        assert cols.mean() < 6 and not (cols >= 12).any()
        assert rows.mean() == pytest.approx(7.5, abs=1.5)
    for image in top:
        rows, cols = np.nonzero(_painted(image, RED))
        assert rows.mean() < 6 and not (rows >= 12).any()  # v = i / 15 grows downwards
        assert cols.mean() == pytest.approx(7.5, abs=1.5)


def test_check_values_of_docs_world_md():
    """docs/world.md section 7: what a re-implementation of the renderer must reproduce."""
    from noiserefine.world.shapes16 import POSITIONS, _shape_mask

    grid = np.arange(16) / 15
    u, v = np.meshgrid(grid, grid)
    for anchor in POSITIONS.values():
        counts = {s: int(_shape_mask(s, u, v, *anchor, 0.19).sum()) for s in ("circle", "square", "triangle")}
        assert counts == {"circle": 24, "square": 16, "triangle": 14}
    rows, cols = np.nonzero(_shape_mask("triangle", u, v, 0.5, 0.5, 0.19))
    assert {i: sorted(cols[rows == i].tolist()) for i in set(rows.tolist())} == {
        6: [7, 8], 7: [7, 8], 8: [6, 7, 8, 9], 9: [5, 6, 7, 8, 9, 10]}
    rng = np.random.default_rng(0)
    prompts = random_prompts(3, rng)
    assert [p.text for p in prompts] == ["a yellow square on the left", "a blue square on the top",
                                         "a blue circle on the left"]
    np.testing.assert_allclose(render(prompts, rng).sum(axis=(1, 2, 3)), [-444.6, -487.6, -475.6], atol=0.01)
    assert ALL_PROMPTS[:5] == ("a red circle on the left", "a red circle on the right", "a red circle on the top",
                               "a red circle on the bottom", "a red square on the left")


def test_the_48_prompts_are_distinct_and_parse_back():
    assert len(ALL_PROMPTS) == 48 and len(set(ALL_PROMPTS)) == 48
    assert all(parse_prompt(text).text == text for text in ALL_PROMPTS)


def test_unknown_word_is_an_error_and_empty_prompt_is_unconditional():
    with pytest.raises(NoiseRefineError, match="purple"):
        parse_prompt("a purple circle on the left")
    with pytest.raises(NoiseRefineError):
        parse_prompt("a red circle the left on")
    assert parse_prompt("") is None
    assert parse_prompt("   ") is None


def test_export_world_is_deterministic_and_labelled(tmp_path):
    a = export_world(tmp_path / "a", n=6, seed=5)
    b = export_world(tmp_path / "b", n=6, seed=5)
    c = export_world(tmp_path / "c", n=6, seed=6)
    rows = [json.loads(line) for line in (a / "labels.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    assert all((a / r["file"]).read_bytes() == (b / r["file"]).read_bytes() for r in rows)
    assert any((a / r["file"]).read_bytes() != (c / r["file"]).read_bytes() for r in rows)
    for k, row in enumerate(rows):
        assert row["prompt"] == f"a {row['color']} {row['shape']} on the {row['position']}"
        assert row["seed"] == 5 and row["index"] == k
        rng = np.random.default_rng([5, k])  # the per-image generator the module documents
        assert random_prompts(1, rng)[0].text == row["prompt"]
        # 8-bit PNG round trip is within half a quantisation step of the render
        expected = render([parse_prompt(row["prompt"])], rng)[0]
        np.testing.assert_allclose(load_png(a / row["file"]), expected, atol=1 / 255 + 1e-6)


def test_export_world_needs_an_existing_parent(tmp_path):
    with pytest.raises(NoiseRefineError, match="parent"):
        export_world(tmp_path / "missing" / "out", n=1, seed=0)
