"""`evaluate_folder` end to end on a small manifest folder, and its errors."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from noiserefine.errors import NoiseRefineError
from noiserefine.evaluation.folder import evaluate_folder
from noiserefine.world.shapes16 import random_prompts, render


def _write_png(path: Path, image: np.ndarray) -> None:
    Image.fromarray(np.rint((image + 1) * 127.5).astype(np.uint8).transpose(1, 2, 0)).save(path)


def _make_folder(root: Path, n: int = 40) -> Path:
    """Group "real": renders with their prompts; group "mismatched": the same renders, prompts shifted."""
    folder = root / "samples"
    folder.mkdir()
    rng = np.random.default_rng(99)
    prompts = random_prompts(n, rng)
    images = render(prompts, rng)
    rows = []
    for k, image in enumerate(images):
        _write_png(folder / f"{k:03d}.png", image)
        common = {"file": f"{k:03d}.png", "seed": k, "pag": 0.0, "steps": 20}
        rows.append({**common, "prompt": prompts[k].text, "method": "real", "cfg": 1.0})
        rows.append({**common, "prompt": prompts[(k + 1) % n].text, "method": "mismatched", "cfg": 5.0})
    _write_manifest(folder, rows)
    return folder


def _write_manifest(folder: Path, rows: list[dict]) -> None:
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def test_evaluate_folder_groups_and_scores(tmp_path):
    folder = _make_folder(tmp_path)
    result = evaluate_folder(folder)
    assert result["n_images"] == 80
    real, mismatched = result["groups"]
    assert (real["method"], real["cfg"], real["pag"], real["steps"], real["count"]) == ("real", 1.0, 0.0, 20, 40)
    assert (mismatched["method"], mismatched["cfg"], mismatched["count"]) == ("mismatched", 5.0, 40)
    assert real["adherence"] >= 0.95 and real["heldout_adherence"] >= 0.95
    assert mismatched["adherence"] < 0.3 and mismatched["heldout_adherence"] < 0.3
    assert real["fd"] == pytest.approx(mismatched["fd"])  # same images, same features
    json.dumps(result)  # JSON-friendly


def test_missing_folder_and_manifest(tmp_path):
    with pytest.raises(NoiseRefineError, match="folder not found"):
        evaluate_folder(tmp_path / "nowhere")
    with pytest.raises(NoiseRefineError, match="manifest.jsonl not found"):
        evaluate_folder(tmp_path)


def test_manifest_line_that_is_not_json(tmp_path):
    folder = _make_folder(tmp_path)
    lines = (folder / "manifest.jsonl").read_text().splitlines()
    lines[2] = '{"file": "000.png", "prompt": '
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(NoiseRefineError, match="line 3 is not valid JSON"):
        evaluate_folder(folder)


def test_manifest_row_missing_a_field(tmp_path):
    folder = _make_folder(tmp_path)
    rows = _rows(folder)
    del rows[4]["steps"]
    _write_manifest(folder, rows)
    with pytest.raises(NoiseRefineError, match=r"line 5 lacks field\(s\) \['steps'\]"):
        evaluate_folder(folder)


def test_missing_image_file(tmp_path):
    folder = _make_folder(tmp_path)
    (folder / "007.png").unlink()
    with pytest.raises(NoiseRefineError, match="image file not found: .*007.png"):
        evaluate_folder(folder)


@pytest.mark.parametrize("size, mode", [((32, 32), "RGB"), ((16, 16), "L")])
def test_image_of_wrong_size_or_mode(tmp_path, size, mode):
    folder = _make_folder(tmp_path)
    Image.new(mode, size).save(folder / "003.png")
    with pytest.raises(NoiseRefineError, match="003.png: expected a 16x16 RGB image"):
        evaluate_folder(folder)


def test_prompt_with_unknown_words(tmp_path):
    folder = _make_folder(tmp_path)
    rows = _rows(folder)
    rows[1]["prompt"] = "a red dog on the left"
    _write_manifest(folder, rows)
    with pytest.raises(NoiseRefineError, match="unknown word"):
        evaluate_folder(folder)


def test_group_of_one_image(tmp_path):
    folder = _make_folder(tmp_path)
    rows = _rows(folder)
    rows[0]["steps"] = 4
    _write_manifest(folder, rows)
    with pytest.raises(NoiseRefineError, match="has 1 image"):
        evaluate_folder(folder)


def test_empty_manifest(tmp_path):
    (tmp_path / "manifest.jsonl").write_text("\n")
    with pytest.raises(NoiseRefineError, match="lists no images"):
        evaluate_folder(tmp_path)
