"""Multi-process runs through `accelerate launch --num_processes 2` on the CPU equal single-process runs.

`accelerate launch --cpu --num_processes 2` starts ONE process on a single machine (accelerate
1.15's simple launcher; multi-CPU needs mpirun). `--multi_gpu --num_processes 2` starts two through
torchrun; without CUDA our code asks for `PartialState(cpu=True)`, a MULTI_CPU state on gloo.

This file is also the launched script (`python test_accelerate.py worker MODEL OUT`): under
accelerate, `make_targets` splits the shards across the processes (process i writes shards i,
i+P, ...), then `train_refiner` trains with each process taking half of every global batch and
DDP averaging the gradients. The single-process reference runs in the test process.

Tolerances: targets are bit-identical (each shard is computed by the same ops in the same batch
layout, whichever process writes it). Training differs in float32 round-off only: DDP averages
two half-batch gradients where one process averages the whole batch, and CPU kernels block a
batch of 2 differently from a batch of 4. AdamW then divides each gradient element by its own
RMS, so elements whose gradient is near Adam's eps (1e-8) turn that round-off into update
differences of a few percent of lr (the LoRA B weights at step 2, reached through a delta head
barely off zero). Checks, with values observed on this machine in brackets: delta head (large
gradients) |dw| <= 1e-5 [7e-7]; relative L2 over all weights <= 1e-4 [5e-6 .. 1.3e-5]; fewer than
0.5% of LoRA weights off by more than 1e-3 lr [0.03%]; no weight off by more than 0.1 lr [0.013 lr];
the logged training loss to 1e-5 relative.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

PROMPTS = ["a red circle on the left", "a blue square on the top", "a green triangle on the right"]
SEEDS = list(range(6))
SHARD_SIZE = 2  # 3 shards: process 0 writes shards 0 and 2, process 1 writes shard 1
LR = 1e-2


def _train_config():
    from noiserefine.train import TrainConfig

    return TrainConfig(steps=2, batch_size=4, lr=LR, msd_steps=2, rank=4, checkpoint_every=10)


def run(model: str, out: Path) -> Path:
    """Targets then 2 training steps; the same call whether 1 or N processes run it."""
    from noiserefine.api import make_targets
    from noiserefine.backbones.loading import load_backbone
    from noiserefine.guidance import Guidance, Teacher
    from noiserefine.train import train_refiner

    out.mkdir(exist_ok=True)
    make_targets(PROMPTS, SEEDS, Teacher(Guidance(cfg=5.0), steps=2), out / "targets", shard_size=SHARD_SIZE,
                 score="none", model=model, batch_size=2)
    return train_refiner(load_backbone(model), out / "targets", out / "run", _train_config(), progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_traceback(stderr: str) -> str:
    """The first worker's traceback: the one that crashed, not the peers' lost-connection errors."""
    start = stderr.find("Traceback")
    return stderr[start: start + 3000] if start >= 0 else stderr[-3000:]


def test_two_processes_equal_one(tmp_path):
    from sd_components import make_tiny_sd_pipe

    from noiserefine.io import load_tensors, read_json
    from noiserefine.methods.refiner_folder import read_folder

    torch.set_num_threads(1)
    model = tmp_path / "model"
    pipe = make_tiny_sd_pipe()
    pipe.unet.register_to_config(sample_size=16)  # default resolution 32 px: 16x16 latents, 4x cheaper
    pipe.save_pretrained(model)
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           __file__, "worker", str(model), str(tmp_path / "two")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, _first_traceback(proc.stderr)

    assert sorted(p.name for p in (tmp_path / "two").glob("process-*")) == ["process-0-of-2", "process-1-of-2"]

    run(str(model), tmp_path / "one")

    for k in range(3):
        one = load_tensors(tmp_path / "one" / "targets" / f"shard-{k:05d}.safetensors")
        two = load_tensors(tmp_path / "two" / "targets" / f"shard-{k:05d}.safetensors")
        assert one.keys() == two.keys()
        for name in one:
            assert torch.equal(one[name], two[name]), f"shard {k} {name} differs"
    w1, w2 = (read_folder(tmp_path / d / "run" / "refiner")[0] for d in ("one", "two"))  # refiner weight names
    assert w1.keys() == w2.keys()
    assert w1["delta_head.weight"].abs().max() > 1e-3  # the two steps did train
    head = max((w1[k] - w2[k]).abs().max().item() for k in w1 if k.startswith("delta_head."))
    worst = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    diff = torch.cat([(w1[k] - w2[k]).flatten() for k in w1])
    rel = (diff.norm() / torch.cat([w1[k].flatten() for k in w1]).norm()).item()
    lora = torch.cat([(w1[k] - w2[k]).flatten() for k in w1 if "lora_" in k]).abs()
    off = (lora > 1e-3 * LR).float().mean().item()
    assert head <= 1e-5 and rel <= 1e-4 and off <= 5e-3 and worst <= 0.1 * LR, (head, rel, off, worst)
    loss1, loss2 = (read_json(tmp_path / d / "run" / "refiner" / "noiserefine.json")["final_loss_avg20"]
                    for d in ("one", "two"))
    assert abs(loss1 - loss2) <= 1e-5 * abs(loss1)


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    from accelerate import PartialState

    torch.set_num_threads(1)
    run(sys.argv[2], Path(sys.argv[3]))
    state = PartialState()
    (Path(sys.argv[3]) / f"process-{state.process_index}-of-{state.num_processes}").touch()
