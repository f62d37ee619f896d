"""Safe file handling: atomic writes and loading safetensors with clear errors."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from noiserefine.errors import NoiseRefineError


def shipped_path(name: str) -> Path:
    """Path of a file shipped in the package's `weights/` folder."""
    return Path(str(resources.files("noiserefine") / "weights" / name))


def _tmp_path(path: Path) -> Path:
    """A temporary name beside `path`, private to this process: processes of one multi-process run
    that write the same file (each writes the same target manifest) must not share a temporary file."""
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so a kill never leaves a half-written file."""
    path = Path(path)
    tmp = _tmp_path(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomic safetensors save (contiguous CPU copies)."""
    path = Path(path)
    tmp = _tmp_path(path)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing or truncated file is a one-line NoiseRefineError."""
    path = Path(path)
    if not path.is_file():
        raise NoiseRefineError(f"weights file not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise NoiseRefineError(f"weights file {path} is truncated or corrupt ({err})") from None


def read_json(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise NoiseRefineError(f"config file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise NoiseRefineError(f"config file {path} is not valid JSON ({err})") from None


def jsonl_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line of a JSON-lines file; a line that is not
    JSON gives the `json.JSONDecodeError` as its value, for the caller to word its own error."""
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                yield number, err


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def ensure_out_dir(path: Path) -> Path:
    """Create an output folder (or use an existing one) under the checks of `OutputFolder`, for
    writers that keep their own resume rules (a shard store checks its manifest)."""
    return OutputFolder(Path(path), ()).open()


@dataclass(frozen=True)
class OutputFolder:
    """The one policy for a folder a command writes its results into.

    `results` are glob patterns of what the command writes there (e.g. `("bench.md", "bench.json")`,
    `("manifest.json", "shard-*.safetensors")`, a folder name such as `"checkpoint"`); other files
    in the folder are neither results nor touched. The policy:

    - the parent folder must exist (a typo should not build a tree silently) and the path must not
      name a file;
    - a folder that already holds results is refused, unless the command `resume`s them (it has
      checked, or will check, that they were made with its own settings and skips what is done) or
      the user asked to `overwrite` them (the command line's `--overwrite`);
    - nothing is created before validation has passed: `check()` only checks, so a command calls it
      with its other argument checks, and calls `open()` once everything is validated (prompts
      encoded, weights found); `open()` creates the folder and, under `overwrite`, first deletes the
      old results -- and only them.

        folder = OutputFolder(out, ("bench.md", "bench.json"), overwrite=overwrite).check()
        ...                                   # validate arguments, load models
        out = folder.open()                   # then write
    """

    path: Path
    results: tuple[str, ...]
    overwrite: bool = False
    resume: bool = False

    def existing(self) -> list[Path]:
        """The results already in the folder (files or folders matching `results`), sorted."""
        path = Path(self.path)
        if not path.is_dir():
            return []
        return sorted({p for pattern in self.results for p in path.glob(pattern)})

    def check(self) -> "OutputFolder":
        """Refuse a path the command may not write to (see the class); creates nothing."""
        path = Path(self.path)
        if path.exists() and not path.is_dir():
            raise NoiseRefineError(f"output {path} is a file, not a folder")
        if not path.parent.is_dir():
            raise NoiseRefineError(f"parent folder of the output does not exist: {path.parent}")
        found = self.existing()
        if found and not (self.overwrite or self.resume):
            names = ", ".join(p.name for p in found[:3]) + (", ..." if len(found) > 3 else "")
            raise NoiseRefineError(f"{path} already holds results ({names}); pass --overwrite to replace "
                                   "them, or choose another folder")
        return self

    def open(self) -> Path:
        """Check again, delete the old results under `overwrite`, create the folder; returns its path.
        Deleting tolerates a result that is already gone (processes of one run may all open)."""
        path = Path(self.check().path)
        if self.overwrite:
            for old in self.existing():
                if old.is_dir() and not old.is_symlink():
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    old.unlink(missing_ok=True)
        path.mkdir(exist_ok=True)
        return path


def state_hash(module: torch.nn.Module, dtype: torch.dtype | None = None) -> str:
    """sha256 (first 16 hex digits) over a module's own weights, in name order; with `dtype`, over
    its floating-point weights rounded to `dtype` (other tensors as they are).

    LoRA weights are skipped and peft's `.base_layer` renaming undone, so a model hashes the same
    with or without a refiner attached."""
    h = hashlib.sha256()
    state = {k.replace(".base_layer", ""): v for k, v in module.state_dict().items() if "lora_" not in k}
    for name, t in sorted(state.items()):
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
