"""The command line: contract of `sample`, and one-line errors with a non-zero exit on bad input."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from noiserefine.backbones.shapes16 import Shapes16Backbone
from noiserefine.cli import main


def _run(*args: str):
    return CliRunner().invoke(main, list(args))


def _assert_one_line_error(result, needle: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.output
    assert "Traceback" not in result.output


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle on the left\na green triangle on the bottom\n")
    return path


@pytest.fixture
def tiny_model(tmp_path):
    path = tmp_path / "tiny.safetensors"
    Shapes16Backbone.create(0).save(path)
    return path


def test_sample_writes_pngs_and_manifest(prompt_file, tiny_model, tmp_path):
    out = tmp_path / "samples"
    result = _run("sample", "--prompt-file", str(prompt_file), "--seeds", "3-4", "--steps", "2",
                  "--cfg", "2", "--guidance-start", "0.5", "--model", str(tiny_model), "--out", str(out))
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    assert {(r["prompt"], r["seed"]) for r in rows} == {
        (p, s) for p in ("a red circle on the left", "a green triangle on the bottom") for s in (3, 4)}
    for r in rows:
        assert (out / r["file"]).is_file()
        assert {"method": "gaussian", "cfg": 2.0, "pag": 0.0, "steps": 2, "guidance_start": 0.5,
                "guidance_stop": 1.0}.items() <= r.items()


def test_bad_guidance_interval(prompt_file, tiny_model, tmp_path):
    result = _run("sample", "--prompt-file", str(prompt_file), "--seeds", "0", "--cfg", "2", "--guidance-start",
                  "0.9", "--guidance-stop", "0.1", "--model", str(tiny_model), "--out", str(tmp_path / "o"))
    _assert_one_line_error(result, "guidance interval")
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_unknown_prompt_word(tmp_path, tiny_model):
    bad = tmp_path / "p.txt"
    bad.write_text("a purple circle on the left\n")
    result = _run("sample", "--prompt-file", str(bad), "--seeds", "0", "--model", str(tiny_model),
                  "--out", str(tmp_path / "o"))
    _assert_one_line_error(result, "purple")


def test_output_parent_must_exist(prompt_file, tiny_model, tmp_path):
    result = _run("sample", "--prompt-file", str(prompt_file), "--seeds", "0", "--model", str(tiny_model),
                  "--out", str(tmp_path / "no" / "such" / "dir"))
    _assert_one_line_error(result, "parent folder")


def test_missing_weights_file(prompt_file, tmp_path):
    result = _run("sample", "--prompt-file", str(prompt_file), "--seeds", "0",
                  "--model", str(tmp_path / "absent.safetensors"), "--out", str(tmp_path / "o"))
    _assert_one_line_error(result, "not found")


def test_truncated_weights_file(prompt_file, tiny_model, tmp_path):
    data = tiny_model.read_bytes()
    tiny_model.write_bytes(data[: len(data) // 3])
    result = _run("sample", "--prompt-file", str(prompt_file), "--seeds", "0", "--model", str(tiny_model),
                  "--out", str(tmp_path / "o"))
    _assert_one_line_error(result, "truncated or corrupt")


def test_bad_seed_range(prompt_file, tiny_model, tmp_path):
    result = _run("sample", "--prompt-file", str(prompt_file), "--seeds", "x-y", "--model", str(tiny_model),
                  "--out", str(tmp_path / "o"))
    _assert_one_line_error(result, "seeds")


def test_eval_of_missing_folder(tmp_path):
    _assert_one_line_error(_run("eval", str(tmp_path / "nothing")), "nothing")
