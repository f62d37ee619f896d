"""Atomic writes when several processes of one run write the same file (the target manifest)."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

from noiserefine.io import read_json, write_json


def _write_many(path: str, n: int) -> None:
    for _ in range(n):
        write_json(Path(path), {"same": "record", "n": n})


def test_concurrent_writers_of_one_file(tmp_path):
    """Two processes rewriting one JSON file 300 times each: no writer loses its temporary file
    to the other (a shared temporary name made `os.replace` fail in a 2-process target run)."""
    path = tmp_path / "manifest.json"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_write_many, args=(str(path), 300)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert read_json(path) == {"same": "record", "n": 300}
    assert not list(tmp_path.glob("*.tmp"))
