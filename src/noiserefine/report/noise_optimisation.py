"""MSD vs full-gradient optimisation of the initial noise itself (NoiseRefine Fig. 6, appendix B.3
Figs. 35-36): x_T is optimised so that its unguided N-step sample x_0 matches a guided target, with
the gradient of Eq. 3 (through every denoiser evaluation) or the MSD gradient of Eqs. 4-5
(stop-gradient on each model output). The forward pass -- and so the loss -- is the same in both;
only the backward pass differs.

Per iteration we record each noise's loss ||x_0 - x_0^Guide||^2 (mean over pixels), the norm of the
gradient that reaches x_T, and ||dL/dx_t||^2 at every sampler state x_t (Fig. 36). `step_memory`
measures what one iteration holds for the backward pass.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch

from noiserefine.backbones.base import Backbone
from noiserefine.evaluation.timing import PeakRSS
from noiserefine.sampling import denoise, make_scheduler

Mode = Literal["msd", "full"]


def _loss(backbone: Backbone, x_T: torch.Tensor, target: torch.Tensor, prompts: Sequence[str], mode: Mode,
          steps: int, states: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Per-noise MSE of the N-step unguided sample to its target; `states` collects every x_t."""
    def keep(i: int, t: torch.Tensor, x: torch.Tensor) -> None:
        x.retain_grad()
        states.append(x)

    with torch.no_grad():
        cond = backbone.encode_prompts(list(prompts))
    sched = make_scheduler("ddim", backbone.scheduler_config)
    x0 = denoise(backbone, sched, x_T, cond, steps=steps, grad_mode=mode, callback=keep if states is not None else None)
    return (x0 - target).pow(2).flatten(1).mean(1)


def optimise_noise(backbone: Backbone, x_T: torch.Tensor, target: torch.Tensor, prompts: Sequence[str], mode: Mode,
                   iterations: int, steps: int = 10, lr: float = 0.05) -> dict[str, Any]:
    """Adam on the noises x_T (each its own problem: the loss is the sum of per-noise losses) for
    `iterations` steps. Returns per-iteration lists: `loss` and `grad_norm` ([iteration][noise]),
    `state_grad_sq` ([iteration][state x_T, x_t1, ..., x_0] summed over noises), and the last `loss`
    after the final update as `final_loss`."""
    backbone.denoiser.requires_grad_(False)  # only x_T is optimised
    x = x_T.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    record: dict[str, Any] = {"mode": mode, "steps": steps, "lr": lr, "loss": [], "grad_norm": [], "state_grad_sq": []}
    for _ in range(iterations):
        states: list[torch.Tensor] = []
        per_noise = _loss(backbone, x, target, prompts, mode, steps, states)
        opt.zero_grad(set_to_none=True)
        per_noise.sum().backward()
        record["loss"].append(per_noise.detach().tolist())
        record["grad_norm"].append(x.grad.flatten(1).norm(dim=1).tolist())
        record["state_grad_sq"].append([float(g.grad.pow(2).sum()) for g in [x, *states]])
        opt.step()
    with torch.no_grad():
        record["final_loss"] = _loss(backbone, x, target, prompts, mode, steps).tolist()
    return record


def step_memory(backbone: Backbone, x_T: torch.Tensor, target: torch.Tensor, prompts: Sequence[str], mode: Mode,
                steps: int = 10) -> dict[str, float]:
    """What one optimisation step of `mode` holds for its backward pass: the bytes of the distinct
    tensors autograd saves (model parameters excluded; exact, independent of the allocator), and
    the process's peak RSS above its level at the start of the step (`PeakRSS`: the kernel's VmHWM,
    reset through /proc/self/clear_refs)."""
    backbone.denoiser.requires_grad_(False)
    weights = {p.untyped_storage().data_ptr() for p in backbone.denoiser.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    x = x_T.detach().clone().requires_grad_(True)
    with PeakRSS() as peak:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = _loss(backbone, x, target, prompts, mode, steps).sum()
        loss.backward()
    return {"saved_for_backward_mb": sum(saved.values()) / 2**20, "peak_rss_mb": peak.extra_mb,
            "batch": int(x_T.shape[0]), "steps": steps}
