"""The shard store: how every generated data set lives on disk (NoiseRefine's guided targets,
NPNet's re-denoised noise pairs).

A folder holds `manifest.json` (what the set is: spec, base model; a resumed run must ask for the
same) and the items in safetensors shards, item i in shard i // shard_size, each shard written
atomically. While a shard fills, its finished batches are flushed to a `.partial` file after every
batch, so a killed run loses at most one batch: a resumed run keeps finished shards, continues a
partial one where it stopped (the finished shard equals the one an uninterrupted run writes) and
generates the rest. The processes of one multi-process run (accelerate) take disjoint shards
(`process_shards`), so no two processes write the same file.

Reading a set back never needs it in memory: `load(names)` reads only the (small) tensors named,
and `rows(name)` is a view whose indexing reads just the rows asked for from the shard files, so
a training process holds only the items of its current batch whatever the set's size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from noiserefine.errors import NoiseRefineError
from noiserefine.io import ensure_out_dir, load_tensors, read_json, save_tensors, write_json

MANIFEST = "manifest.json"

Batch = dict[str, torch.Tensor]
"""A batch of items: tensors whose first dimension runs over the batch's items."""


def results(prefix: str) -> tuple[str, str]:
    """What a shard folder of files `<prefix>-*` holds (`io.OutputFolder` results): its manifest
    and its shards, finished or partial."""
    return MANIFEST, f"{prefix}-*.safetensors"


def read_manifest(folder: Path, items: str) -> dict:
    """The manifest of a shard folder of `items` ("targets", "pairs"), with a message naming what is
    missing when the folder or its manifest is."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NoiseRefineError(f"{items} folder not found: {folder}")
    if not (folder / MANIFEST).is_file():
        raise NoiseRefineError(f"{folder} holds no {items} ({MANIFEST} missing)")
    return read_json(folder / MANIFEST)


@dataclass(frozen=True)
class ShardStore:
    """`size` items in shards of `shard_size` under `folder`, files `<prefix>-00000.safetensors`;
    `items` names them in messages."""

    folder: Path
    size: int
    shard_size: int
    prefix: str
    items: str

    def __post_init__(self) -> None:
        if self.size < 1:
            raise NoiseRefineError(f"a {self.items} set needs at least one item, got {self.size}")
        if self.shard_size < 1:
            raise NoiseRefineError(f"shard size must be >= 1, got {self.shard_size}")

    @property
    def num_shards(self) -> int:
        return -(-self.size // self.shard_size)

    def shard_range(self, k: int) -> range:
        """The item indices of shard k."""
        return range(k * self.shard_size, min((k + 1) * self.shard_size, self.size))

    def path(self, k: int) -> Path:
        return self.folder / f"{self.prefix}-{k:05d}.safetensors"

    def partial_path(self, k: int) -> Path:
        return self.folder / f"{self.prefix}-{k:05d}.partial.safetensors"

    def done(self, k: int) -> bool:
        return self.path(k).is_file()

    def process_shards(self, index: int, count: int) -> range:
        """The shards process `index` of `count` writes: index, index + count, ... (disjoint)."""
        if not 0 <= index < count:
            raise NoiseRefineError(f"process index {index} is not in [0, {count})")
        return range(index, self.num_shards, count)

    def claim(self, record: dict, read: Callable[[Path], dict] | None = None,
              same_base: Callable[[Any, Any], bool] | None = None) -> None:
        """Create the folder and write `record` as its manifest, or check that the manifest there
        (as `read(folder)` returns it; default: the file itself) is `record`: its `base` entry (the
        model fingerprint) as `same_base(found, ours)` says (default: equal), the rest equal."""
        ensure_out_dir(self.folder)
        if (self.folder / MANIFEST).is_file():
            found = read(self.folder) if read else read_json(self.folder / MANIFEST)
            same = same_base or (lambda a, b: a == b)
            if {**found, "base": None} != {**record, "base": None} or not same(found.get("base"), record.get("base")):
                raise NoiseRefineError(f"{self.folder} holds {self.items} of another spec or base model; "
                                       "use a new folder")
            return
        write_json(self.folder / MANIFEST, record)

    def pending(self, shard_ids: Iterable[int]) -> tuple[list[int], int, int]:
        """(unfinished shards among `shard_ids`, their items, items already in their partial files)."""
        todo = [k for k in shard_ids if not self.done(k)]
        flushed = sum(len(self._partial(k)["index"]) if self.partial_path(k).is_file() else 0 for k in todo)
        return todo, sum(len(self.shard_range(k)) for k in todo), flushed

    def fill(self, shard_ids: Sequence[int], make_batch: Callable[[list[int]], Batch], batch_size: int,
             on_batch: Callable[[Batch], None] = lambda batch: None) -> None:
        """Write the unfinished shards among `shard_ids`: `make_batch(indices)` makes the tensors of
        up to `batch_size` items (the store adds their `index`); `on_batch` sees each new batch."""
        if batch_size < 1:
            raise NoiseRefineError(f"batch size must be >= 1, got {batch_size}")
        for k in shard_ids:
            if not self.done(k):
                self._fill_shard(k, make_batch, batch_size, on_batch)

    def _fill_shard(self, k: int, make_batch: Callable[[list[int]], Batch], batch_size: int,
                    on_batch: Callable[[Batch], None]) -> None:
        idx = list(self.shard_range(k))
        parts = [self._partial(k)] if self.partial_path(k).is_file() else []
        for lo in range(sum(len(p["index"]) for p in parts), len(idx), batch_size):
            chunk = idx[lo: lo + batch_size]
            batch = {**make_batch(chunk), "index": torch.tensor(chunk, dtype=torch.long)}
            parts.append(batch)
            on_batch(batch)
            if lo + batch_size < len(idx):
                save_tensors(self.partial_path(k), _cat(parts))
        save_tensors(self.path(k), _cat(parts))
        self.partial_path(k).unlink(missing_ok=True)

    def _partial(self, k: int) -> Batch:
        """The flushed batches of shard k; refused if they are not a prefix of the shard's items."""
        part = load_tensors(self.partial_path(k))
        expected = torch.tensor(list(self.shard_range(k))[: len(part.get("index", []))], dtype=torch.long)
        if "index" not in part or not torch.equal(part["index"], expected):
            raise NoiseRefineError(f"{self.partial_path(k)} does not hold the first items of shard {k}; "
                                   "delete it to regenerate the shard")
        return part

    def finished(self) -> list[int]:
        """The finished shards (partial shards are never read); none is an error."""
        shards = [k for k in range(self.num_shards) if self.done(k)]
        if not shards:
            raise NoiseRefineError(f"{self.folder} has no finished shard of {self.items} yet")
        return shards

    def load(self, names: Sequence[str] | None = None) -> Batch:
        """Tensors `names` (default: all) of every finished shard, concatenated in item order."""
        if names is None:
            return _cat([load_tensors(self.path(k)) for k in self.finished()])
        return _cat([{name: _read(self.path(k), name, slice(None)) for name in names} for k in self.finished()])

    def rows(self, name: str) -> "ShardRows":
        """A view of tensor `name` over the items of every finished shard, in item order, read on demand."""
        shards = self.finished()
        sizes = [len(self.shard_range(k)) for k in shards]
        return ShardRows(name, tuple(self.path(k) for k in shards), np.repeat(np.arange(len(shards)), sizes),
                         np.concatenate([np.arange(n) for n in sizes]))


@dataclass(frozen=True)
class ShardRows:
    """Item j is row `row[j]` of tensor `name` in file `files[file_of[j]]`. Indexing (an int, a
    slice, a list or array of indices) reads only those rows from the files (safetensors slices of
    memory-mapped files, unmapped again after each read), so the view costs a few bytes per item."""

    name: str
    files: tuple[Path, ...]
    file_of: np.ndarray
    row: np.ndarray

    def __len__(self) -> int:
        return len(self.row)

    def __getitem__(self, index: Any) -> torch.Tensor:
        if isinstance(index, torch.Tensor):
            index = index.cpu().numpy()
        picks = np.arange(len(self))[index]
        if np.ndim(picks) == 0:
            return self[[int(picks)]][0]
        if len(picks) == 0:
            return _read(self.files[0], self.name, slice(0, 0))
        parts: list[torch.Tensor | None] = [None] * len(picks)
        for f in np.unique(self.file_of[picks]):
            where = np.flatnonzero(self.file_of[picks] == f)
            rows = _read(self.files[f], self.name, [int(self.row[picks[j]]) for j in where])
            for j, r in zip(where, rows):
                parts[j] = r
        return torch.stack(parts)

    def subset(self, index: np.ndarray) -> "ShardRows":
        """The items `index` of this view, in that order (nothing is read)."""
        return ShardRows(self.name, self.files, self.file_of[index], self.row[index])

    @classmethod
    def cat(cls, views: Sequence["ShardRows"]) -> "ShardRows":
        """Several views of one tensor name, one after the other (e.g. several folders)."""
        offsets = np.cumsum([0] + [len(v.files) for v in views[:-1]])
        return cls(views[0].name, tuple(f for v in views for f in v.files),
                   np.concatenate([v.file_of + o for v, o in zip(views, offsets)]),
                   np.concatenate([v.row for v in views]))


def _read(path: Path, name: str, rows: slice | list[int]) -> torch.Tensor:
    """Rows `rows` (a slice, or a list of row numbers) of tensor `name` of a safetensors file,
    without reading the rest of the file; a missing or corrupt file is a NoiseRefineError."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            if name not in handle.keys():
                raise NoiseRefineError(f"{path} holds no tensor {name!r}")
            view = handle.get_slice(name)
            if isinstance(rows, slice):
                return view[rows]
            return torch.cat([view[r: r + 1] for r in rows])
    except (SafetensorError, OSError) as err:
        raise NoiseRefineError(f"shard {path} is missing, truncated or corrupt ({err})") from None


def _cat(parts: Sequence[Batch]) -> Batch:
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
