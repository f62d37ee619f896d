"""Prompts from a text file or a column of a local dataset file (issue 14, item 6)."""

from __future__ import annotations

import importlib.util

import pytest

from noiserefine.errors import NoiseRefineError
from noiserefine.prompt_files import read_prompts

HAS_PARQUET_READER = any(importlib.util.find_spec(m) is not None for m in ("pyarrow", "pandas"))


def test_text_file_one_prompt_per_line(tmp_path):
    (tmp_path / "p.txt").write_text("a red circle\n\n  a blue square  \n")
    assert read_prompts(tmp_path / "p.txt") == ["a red circle", "a blue square"]
    with pytest.raises(NoiseRefineError, match="applies to .csv and .parquet files"):
        read_prompts(tmp_path / "p.txt", "caption")


def test_csv_column(tmp_path):
    path = tmp_path / "coco.csv"
    path.write_text('image_id,caption\n1,"A cat on a mat, asleep"\n2,a dog\n')
    assert read_prompts(path, "caption") == ["A cat on a mat, asleep", "a dog"]
    with pytest.raises(NoiseRefineError, match="has columns image_id, caption: name the prompt column"):
        read_prompts(path)
    with pytest.raises(NoiseRefineError, match="no column 'text'; its columns: image_id, caption"):
        read_prompts(path, "text")
    (tmp_path / "one.csv").write_text("caption\na bird\n")
    assert read_prompts(tmp_path / "one.csv") == ["a bird"]  # one column needs no name
    (tmp_path / "gap.csv").write_text("id,caption\n1,a bird\n2,\n")
    with pytest.raises(NoiseRefineError, match="row 2 of column 'caption' holds no prompt"):
        read_prompts(tmp_path / "gap.csv", "caption")
    with pytest.raises(NoiseRefineError, match="prompt file not found"):
        read_prompts(tmp_path / "missing.csv", "caption")


@pytest.mark.skipif(HAS_PARQUET_READER, reason="a parquet reader is installed")
def test_parquet_without_a_reader_is_a_clear_error(tmp_path):
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(NoiseRefineError, match="needs pyarrow or pandas, and neither is installed"):
        read_prompts(tmp_path / "d.parquet", "caption")


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="pyarrow is not installed")
def test_parquet_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [1, 2], "caption": ["a cat", "a dog"]}), tmp_path / "d.parquet")
    assert read_prompts(tmp_path / "d.parquet", "caption") == ["a cat", "a dog"]
