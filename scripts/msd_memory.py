"""Peak memory of one refiner training step: MSD (Eq. 5) vs the full-gradient loss (Eq. 3).

Each configuration runs in a fresh subprocess and reports its peak RSS growth over one training
step (after a warm-up step), so earlier runs cannot hide later peaks. Usage:

    .venv/bin/python scripts/msd_memory.py [--batch 32] [--n 5 10 20]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, torch
torch.set_num_threads(1)
from noiserefine.backbones.shapes16 import Shapes16Backbone
from noiserefine.methods.refine import NoiseRefiner
from noiserefine.sampling import denoise, make_scheduler, noise_for_seeds
loss_name, n, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
bb = Shapes16Backbone.load()
refiner = NoiseRefiner(bb)
opt = torch.optim.AdamW(refiner.trainable_parameters(), lr=1e-4)
prompts = ["a red circle on the left"] * batch
x_T = noise_for_seeds(list(range(batch)), bb.latent_shape)
target = torch.zeros_like(x_T)
with torch.no_grad():
    cond = bb.encode_prompts(prompts)
def step():
    x_hat = refiner(x_T, cond)
    x0 = denoise(bb, make_scheduler("ddim", bb.scheduler_config), x_hat, cond, steps=n, grad_mode=loss_name)
    loss = torch.nn.functional.mse_loss(x0, target)
    opt.zero_grad(); loss.backward(); opt.step()
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
import time; t0 = time.perf_counter(); step(); dt = time.perf_counter() - t0
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"loss": loss_name, "N": n, "batch": batch, "peak_rss_mb": after / 1024,
                  "growth_over_warm_step_mb": (after - before) / 1024, "step_seconds": round(dt, 2)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--n", type=int, nargs="+", default=[5, 10, 20])
    args = ap.parse_args()
    rows = []
    for loss in ("msd", "full"):
        for n in args.n:
            out = subprocess.run([sys.executable, "-c", CHILD, loss, str(n), str(args.batch)],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| loss | N | peak RSS (MB) | step (s) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['loss']} | {r['N']} | {r['peak_rss_mb']:.0f} | {r['step_seconds']} |")


if __name__ == "__main__":
    main()
