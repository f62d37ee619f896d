"""The shard store: atomic shards + manifest, resume keeps finished shards and continues a partial
one, disjoint shards per process, clear errors; and NoiseRefine targets keep the progress of a run
killed before its first (default-size) shard was full."""

from __future__ import annotations

import pytest
import torch

from noiserefine import targets as targets_module
from noiserefine.backbones.shapes16 import Shapes16Backbone
from noiserefine.errors import NoiseRefineError
from noiserefine.guidance import Guidance, Teacher
from noiserefine.io import load_tensors, save_tensors
from noiserefine.shards import ShardStore, read_manifest
from noiserefine.targets import TargetSpec, generate_targets, load_targets
from noiserefine.world import ALL_PROMPTS


def _store(folder, size=10, shard_size=4) -> ShardStore:
    return ShardStore(folder, size, shard_size, prefix="part", items="things")


def _make(calls: list, kill_at: int | None = None):
    """A batch maker that records the items it was asked for and raises at call `kill_at`."""
    def make(idx: list[int]) -> dict[str, torch.Tensor]:
        if len(calls) == kill_at:
            raise KeyboardInterrupt
        calls.append(list(idx))
        return {"value": torch.tensor(idx, dtype=torch.float32) * 10, "square": torch.tensor(idx) ** 2}
    return make


def test_a_killed_fill_keeps_its_finished_batches_and_resumes_to_the_same_shards(tmp_path):
    whole = _store(tmp_path / "whole")
    whole.claim({"spec": 1})
    whole.fill(range(whole.num_shards), _make([]), batch_size=3)
    assert [len(whole.shard_range(k)) for k in range(whole.num_shards)] == [4, 4, 2]

    store = _store(tmp_path / "killed")
    store.claim({"spec": 1})
    calls: list = []
    with pytest.raises(KeyboardInterrupt):  # batches [0-2], [3], [4-6], then killed in shard 1
        store.fill(range(store.num_shards), _make(calls, kill_at=3), batch_size=3)
    assert calls == [[0, 1, 2], [3], [4, 5, 6]]
    assert store.done(0) and not store.done(1) and store.partial_path(1).is_file()
    assert load_tensors(store.partial_path(1))["index"].tolist() == [4, 5, 6]
    assert store.pending(range(3)) == ([1, 2], 6, 3)  # 6 items left to write, 3 already flushed

    calls.clear()
    store.fill(range(store.num_shards), _make(calls), batch_size=3)
    assert calls == [[7], [8, 9]]  # nothing finished or flushed is made again
    assert not store.partial_path(1).exists()
    for k in range(store.num_shards):
        a, b = load_tensors(store.path(k)), load_tensors(whole.path(k))
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    data = store.load()
    assert data["index"].tolist() == list(range(10)) and torch.equal(data["value"], torch.arange(10.0) * 10)


def test_processes_take_disjoint_shards_that_cover_the_set(tmp_path):
    store = _store(tmp_path / "s", size=23, shard_size=3)  # 8 shards
    shares = [list(store.process_shards(i, 3)) for i in range(3)]
    assert sorted(k for share in shares for k in share) == list(range(8))
    assert shares[0] == [0, 3, 6]
    with pytest.raises(NoiseRefineError, match="process index 3"):
        store.process_shards(3, 3)


def test_manifest_is_written_once_and_a_different_one_is_refused(tmp_path):
    store = _store(tmp_path / "s")
    store.claim({"spec": {"seeds": [1, 2]}, "base": "a"})
    store.claim({"spec": {"seeds": [1, 2]}, "base": "a"})  # the same: a resume
    with pytest.raises(NoiseRefineError, match="holds things of another spec or base model"):
        store.claim({"spec": {"seeds": [1, 2, 3]}, "base": "a"})
    # `read` lets a caller compare an old manifest in today's form
    store.claim({"spec": "today"}, read=lambda folder: {"spec": "today"})
    assert read_manifest(tmp_path / "s", "things") == {"spec": {"seeds": [1, 2]}, "base": "a"}


def test_clear_errors(tmp_path):
    with pytest.raises(NoiseRefineError, match="things folder not found"):
        read_manifest(tmp_path / "missing", "things")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoiseRefineError, match="holds no things"):
        read_manifest(tmp_path / "empty", "things")
    store = _store(tmp_path / "s")
    store.claim({})
    with pytest.raises(NoiseRefineError, match="no finished shard of things"):
        store.load()
    with pytest.raises(NoiseRefineError, match="batch size"):
        store.fill([0], _make([]), batch_size=0)
    with pytest.raises(NoiseRefineError, match="shard size"):
        _store(tmp_path / "t", shard_size=0)
    with pytest.raises(NoiseRefineError, match="at least one item"):
        _store(tmp_path / "t", size=0)
    # a partial file that is not the start of its shard is refused, not silently merged
    save_tensors(store.partial_path(1), {"index": torch.tensor([5, 6]), "value": torch.zeros(2)})
    with pytest.raises(NoiseRefineError, match="does not hold the first items of shard 1"):
        store.fill([1], _make([]), batch_size=2)


def test_targets_killed_before_the_first_default_shard_is_full_keep_their_progress(tmp_path, monkeypatch):
    """`targets` with the default shard size (256) used to save nothing when killed before 256
    targets: a small killed run restarted from zero."""
    spec = TargetSpec(list(ALL_PROMPTS[:3]), list(range(6)), Teacher(Guidance(cfg=3.0), steps=2))
    assert spec.shard_size == 256
    bb = Shapes16Backbone.create(0)
    generate_targets(bb, spec, tmp_path / "whole", batch_size=2, progress=False)

    real = targets_module._generate_batch

    def recording(made: list, kill_at: int | None = None):
        def generate(backbone, spec, batch, scorer):
            if len(made) == kill_at:
                raise KeyboardInterrupt
            made.append(list(batch))
            return real(backbone, spec, batch, scorer)
        return generate

    made: list = []
    monkeypatch.setattr(targets_module, "_generate_batch", recording(made, kill_at=2))
    with pytest.raises(KeyboardInterrupt):
        generate_targets(bb, spec, tmp_path / "killed", batch_size=2, progress=False)
    assert made == [[0, 1], [2, 3]]
    made = []
    monkeypatch.setattr(targets_module, "_generate_batch", recording(made))
    generate_targets(bb, spec, tmp_path / "killed", batch_size=2, progress=False)
    assert made == [[4, 5]]  # only the targets the kill lost are made
    a, b = load_targets(tmp_path / "killed"), load_targets(tmp_path / "whole")
    assert a.prompts == b.prompts and torch.equal(a.x_T[:], b.x_T[:])
    torch.testing.assert_close(a.x_0[:], b.x_0[:], rtol=0, atol=1e-6)
