"""Prompt lists from files: a text file (one prompt per line), or one column of a local dataset
file, CSV (with a header row) or Parquet (read with pyarrow, or pandas, when installed): the
caption column of an MS-COCO or Pick-a-Pic export, as the paper's recipes use (appendix D.2.1).
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

from noiserefine.errors import NoiseRefineError

DATASET_SUFFIXES = (".csv", ".parquet")


def read_prompts(path: Path, column: str | None = None) -> list[str]:
    """The prompts of `path`: the non-blank lines of a text file, or the values of `column` of a
    .csv or .parquet file (a file of one column needs none). Every value must be non-empty text."""
    path = Path(path)
    if not path.is_file():
        raise NoiseRefineError(f"prompt file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in DATASET_SUFFIXES:
        if column is not None:
            raise NoiseRefineError(f"a prompt column applies to {' and '.join(DATASET_SUFFIXES)} files, not {path.name}")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        prompts = _checked(path, *(_csv_column if suffix == ".csv" else _parquet_column)(path, column))
    if not prompts:
        raise NoiseRefineError(f"prompt file {path} has no prompts")
    return prompts


def _pick(path: Path, names: list[str], column: str | None) -> str:
    """The column to read: `column`, or the only one."""
    if column is None and len(names) == 1:
        return names[0]
    if column is None:
        raise NoiseRefineError(f"{path} has columns {', '.join(names)}: name the prompt column (--prompt-column)")
    if column not in names:
        raise NoiseRefineError(f"{path} has no column {column!r}; its columns: {', '.join(names)}")
    return column


def _checked(path: Path, column: str, values: list) -> list[str]:
    for i, value in enumerate(values):
        if not isinstance(value, str) or not value.strip():
            raise NoiseRefineError(f"{path}: row {i + 1} of column {column!r} holds no prompt ({value!r})")
    return [v.strip() for v in values]


def _csv_column(path: Path, column: str | None) -> tuple[str, list]:
    """(the column read, its values)."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        names = list(reader.fieldnames or [])
        if not names:
            raise NoiseRefineError(f"{path} has no header row naming its columns")
        name = _pick(path, names, column)
        return name, [row[name] for row in reader]


def _parquet_column(path: Path, column: str | None) -> tuple[str, list]:
    """(the column read, its values)."""
    if importlib.util.find_spec("pyarrow") is not None:
        import pyarrow.parquet as pq

        name = _pick(path, list(pq.read_schema(path).names), column)
        return name, pq.read_table(path, columns=[name]).column(0).to_pylist()
    if importlib.util.find_spec("pandas") is not None:
        import pandas

        frame = pandas.read_parquet(path)
        name = _pick(path, [str(c) for c in frame.columns], column)
        return name, frame[name].tolist()
    raise NoiseRefineError(f"reading {path.name} needs pyarrow or pandas, and neither is installed "
                           "(pip install pyarrow), or give the prompts as a .csv or text file")
