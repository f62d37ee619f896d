"""Checkpoints are atomic: a save killed after any of its file-system operations leaves the complete
previous checkpoint or the complete new one, never a mix; the next save works and cleans up.
Checkpoints of the old two-file layout (state.safetensors + state.json) load, or fail clearly."""

from __future__ import annotations

import os
import pathlib
import shutil

import pytest
import torch

import noiserefine.io as io_module
from noiserefine.checkpoint import (
    load_checkpoint, optimizer_tensors, read_checkpoint, save_checkpoint,
)
from noiserefine.errors import NoiseRefineError
from noiserefine.io import save_tensors, write_json


class Killed(BaseException):
    """The simulated kill (a BaseException, as SIGKILL is uncatchable: no `except Exception` stops it)."""


def _half_save_file(real):
    def half(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        data = pathlib.Path(filename).read_bytes()
        pathlib.Path(filename).write_bytes(data[: len(data) // 2])
    return half


def _half_write_bytes(real):
    def half(self, data):
        real(self, data[: len(data) // 2])
    return half


# Every primitive that changes the file system, as the checkpoint code (and io) reach it. Writes
# that are killed leave half a file behind; other operations are killed before they happen.
_PRIMITIVES = [(os, "replace", None), (os, "rename", None), (os, "unlink", None), (os, "remove", None),
               (os, "rmdir", None), (os, "mkdir", None), (shutil, "rmtree", None),
               (pathlib.Path, "write_bytes", _half_write_bytes), (io_module, "save_file", _half_save_file)]


def _save_killed_after(k, monkeypatch, *args) -> int | None:
    """Run save_checkpoint(*args), killed at its file-system operation number k (0-based);
    returns the number of operations when the save finished before reaching k, else None."""
    done = 0

    def wrap(real, partial):
        def op(*a, **kw):
            nonlocal done
            if done == k:
                if partial is not None:
                    partial(real)(*a, **kw)
                raise Killed
            done += 1
            return real(*a, **kw)
        return op

    with monkeypatch.context() as m:
        for owner, name, partial in _PRIMITIVES:
            m.setattr(owner, name, wrap(getattr(owner, name), partial))
        try:
            save_checkpoint(*args)
        except Killed:
            return None
    return done


def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    return net, torch.optim.AdamW(net.parameters(), lr=1e-2)


def _train(net, opt, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        net(torch.randn(5, 3)).square().mean().backward()
        opt.step()


def _snapshot(net, opt, step: int) -> dict:
    tensors, _ = optimizer_tensors(opt)
    return {"step": step, "weights": {k: v.clone() for k, v in net.state_dict().items()},
            "opt": {k: v.clone() for k, v in tensors.items()}, "losses": [float(i) for i in range(step)]}


def _loaded(folder) -> dict | None:
    net, opt = _model()
    record = load_checkpoint(folder, {"net": net}, opt)
    if record is None:
        return None
    snap = _snapshot(net, opt, record["step"])
    assert record["losses"] == snap["losses"]  # the record belongs to the same step as the weights
    return snap


def _same(a: dict, b: dict) -> bool:
    return a["step"] == b["step"] and all(
        a[part].keys() == b[part].keys() and all(torch.equal(a[part][k], b[part][k]) for k in a[part])
        for part in ("weights", "opt"))


def _save_old_layout(folder, step, modules, opt, extra) -> None:
    """save_checkpoint as it was before the one-file layout: weights replaced, then state.json."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"{n}.{k}": v for n, m in modules.items() for k, v in m.state_dict().items()}
    opt_t, opt_meta = optimizer_tensors(opt)
    save_tensors(folder / "state.safetensors", tensors | opt_t)
    write_json(folder / "state.json", {"step": step, "optimizer": opt_meta, **extra})


@pytest.mark.parametrize("previous", ["none", "one-file", "old layout"])
def test_a_save_killed_anywhere_leaves_the_old_or_the_new_checkpoint(tmp_path, monkeypatch, previous):
    kills = 0
    for k in range(100):
        folder = tmp_path / f"kill{k}" / "checkpoint"
        net, opt = _model()
        _train(net, opt, 2)
        old = _snapshot(net, opt, 2)
        if previous == "one-file":
            save_checkpoint(folder, 2, {"net": net}, opt, {"losses": old["losses"]})
        elif previous == "old layout":
            _save_old_layout(folder, 2, {"net": net}, opt, {"losses": old["losses"]})
        _train(net, opt, 2)
        new = _snapshot(net, opt, 4)
        finished = _save_killed_after(k, monkeypatch, folder, 4, {"net": net}, opt, {"losses": new["losses"]})
        seen = _loaded(folder)
        if finished is not None:
            assert _same(seen, new)
            break
        kills += 1
        if seen is None:
            assert previous == "none", f"killed at operation {k}: the previous checkpoint is lost"
        else:
            whole = _same(seen, old) or _same(seen, new)
            assert whole, f"killed at operation {k}: a mixed checkpoint (step {seen['step']})"
        # the next save (by a new process: another pid) works and leaves no files of the killed one
        _train(net, opt, 2)
        with monkeypatch.context() as m:
            m.setattr(os, "getpid", lambda pid=os.getpid(): pid + 1)
            save_checkpoint(folder, 6, {"net": net}, opt, {"losses": [float(i) for i in range(6)]})
        assert _same(_loaded(folder), _snapshot(net, opt, 6))
        assert not [p for p in folder.parent.rglob("*") if ".tmp" in p.name], "a killed save's file is left"
    assert kills >= 2  # a save has several operations, each was cut


def test_the_record_travels_inside_the_weights_file(tmp_path):
    net, opt = _model()
    _train(net, opt, 3)
    save_checkpoint(tmp_path, 3, {"net": net}, opt, {"losses": [0.5, 0.25, 0.125], "config": {"lr": 1e-2}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.safetensors"]
    record = read_checkpoint(tmp_path)
    assert record["step"] == 3 and record["losses"] == [0.5, 0.25, 0.125] and record["config"] == {"lr": 1e-2}
    assert read_checkpoint(tmp_path / "empty") is None


def test_an_old_layout_checkpoint_loads_and_the_next_save_converts_it(tmp_path):
    net, opt = _model()
    _train(net, opt, 2)
    _save_old_layout(tmp_path, 2, {"net": net}, opt, {"losses": [0.0, 1.0], "config": {"lr": 1e-2}})
    assert _same(_loaded(tmp_path), _snapshot(net, opt, 2))
    assert read_checkpoint(tmp_path)["config"] == {"lr": 1e-2}
    _train(net, opt, 1)
    save_checkpoint(tmp_path, 3, {"net": net}, opt, {"losses": [0.0, 1.0, 2.0]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.safetensors"]
    assert _same(_loaded(tmp_path), _snapshot(net, opt, 3))


def test_a_torn_old_layout_checkpoint_is_a_clear_error(tmp_path):
    """The old save's failure mode: killed between its two writes, new weights beside the old record."""
    net, opt = _model()
    _train(net, opt, 2)
    _save_old_layout(tmp_path, 2, {"net": net}, opt, {"losses": [1.0, 0.5]})
    _train(net, opt, 2)
    tensors = {f"net.{k}": v for k, v in net.state_dict().items()} | optimizer_tensors(opt)[0]
    save_tensors(tmp_path / "state.safetensors", tensors)  # ... and the kill came before state.json
    for read in (read_checkpoint, lambda f: load_checkpoint(f, {"net": _model()[0]}, _model()[1])):
        with pytest.raises(NoiseRefineError, match=r"torn.*state.json is at step 2 but the weights at step 4"):
            read(tmp_path)


def test_incomplete_old_layout_folders_are_clear_errors(tmp_path):
    net, opt = _model()
    _train(net, opt, 1)
    (tmp_path / "a").mkdir()
    save_tensors(tmp_path / "a" / "state.safetensors", net.state_dict())  # weights, no record
    with pytest.raises(NoiseRefineError, match="no training record"):
        read_checkpoint(tmp_path / "a")
    (tmp_path / "b").mkdir()
    write_json(tmp_path / "b" / "state.json", {"step": 1})
    with pytest.raises(NoiseRefineError, match="no state.safetensors"):
        read_checkpoint(tmp_path / "b")


def test_a_corrupt_checkpoint_file_is_a_clear_error(tmp_path):
    (tmp_path / "state.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad")
    with pytest.raises(NoiseRefineError, match="truncated or corrupt"):
        read_checkpoint(tmp_path)
