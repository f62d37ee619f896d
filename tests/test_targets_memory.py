"""Training reads target sets shard by shard (issue 14, item 6): opening a set and drawing batches
from it holds only the batch, so peak memory does not grow with the set. Measured in a fresh
process (the kernel's peak RSS, VmHWM) on synthetic sets of 256 and 1,024 targets of 4 x 64 x 64
float32 latents (32 and 128 MiB of x_T and x_0); loading them whole, as before, grows the peak by
about the set's size."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from noiserefine.guidance import Teacher
from noiserefine.shards import ShardStore
from noiserefine.targets import TargetSpec, load_targets

LATENT = (4, 64, 64)
MIB = 2**20
BYTES_PER_TARGET = 2 * 4 * 4 * 64 * 64  # x_T and x_0, float32

PEAK_SCRIPT = """
import gc
import sys
import numpy as np
from noiserefine.evaluation.timing import PeakRSS
from noiserefine.targets import load_targets

def train_like(folder):  # as training does: a random batch of 32 per step, used and dropped
    data = load_targets(folder, keep_fraction=0.75)
    rng = np.random.default_rng(0)
    for step in range(40):
        idx = rng.choice(len(data), size=32, replace=False)
        (data.x_T[idx] - data.x_0[idx]).sum()

train_like(sys.argv[1])  # untimed: first-use allocations and lazy imports
for folder in sys.argv[1:]:
    gc.collect()
    with PeakRSS() as peak:
        train_like(folder)
    print(peak.extra_mb)
"""


def synthetic_targets(folder: Path, n: int) -> Path:
    """A target folder of `n` random targets in the layout `generate_targets` writes (no model run)."""
    spec = TargetSpec([f"prompt {i}" for i in range(7)], list(range(n)), Teacher(), shard_size=64, score="judge")
    store = ShardStore(folder, n, spec.shard_size, prefix="shard", items="targets")
    store.claim({"spec": spec.to_record(), "base": {"architecture": "synthetic", "weights_sha256": "0"},
                 "latent_shape": list(LATENT), "sampler": {"timestep_spacing": "trailing"}})
    gen = torch.Generator().manual_seed(n)

    def batch(idx: list[int]) -> dict[str, torch.Tensor]:
        return {"x_T": torch.randn(len(idx), *LATENT, generator=gen), "x_0": torch.randn(len(idx), *LATENT, generator=gen),
                "score": torch.rand(len(idx), generator=gen), "cfg": torch.ones(len(idx))}

    store.fill(range(store.num_shards), batch, batch_size=64)
    return folder


def peak_growth_mib(*folders: Path) -> list[float]:
    """Peak RSS growth (MiB) of opening each folder and drawing 40 batches from it, in one fresh
    process (the kernel's high-water mark, reset before each)."""
    result = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, *map(str, folders)], capture_output=True, text=True,
                            check=True)
    return [float(line) for line in result.stdout.split()]


def test_peak_memory_stays_flat_as_the_set_grows(tmp_path):
    small, large = synthetic_targets(tmp_path / "small", 256), synthetic_targets(tmp_path / "large", 1024)
    grow_small, grow_large = peak_growth_mib(small, large)
    set_mib = 1024 * BYTES_PER_TARGET / MIB  # 128 MiB
    assert grow_large < grow_small + 8, (grow_small, grow_large)  # 4x the set: at most 8 MiB more
    assert grow_large < set_mib / 8, (grow_large, set_mib)  # far below the set (loaded whole: >= 96 MiB)


def test_rows_read_from_the_shards_are_the_targets(tmp_path):
    """The views read the rows they are asked for, in the kept order, across shards."""
    folder = synthetic_targets(tmp_path / "t", 150)
    whole = ShardStore(folder, 150, 64, prefix="shard", items="targets").load()
    data = load_targets(folder, keep_fraction=0.5)
    kept = torch.sort(torch.sort(whole["score"], descending=True, stable=True).indices[:75]).values
    assert len(data) == 75 and torch.equal(data.score, whole["score"][kept])
    assert torch.equal(data.x_0[:], whole["x_0"][kept]) and torch.equal(data.x_T[[74, 0, 40]], whole["x_T"][kept[[74, 0, 40]]])
    assert torch.equal(data.x_T[3], whole["x_T"][kept[3]]) and data.x_T[[]].shape == (0, *LATENT)
