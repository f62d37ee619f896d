"""DDIM inversion (Song et al. 2020, Eq. 13 run backwards): x_0 -> x_T with the same model.

Used for the noise-space loss ablation of NoiseRefine (Tab. 1: regress the inversion noise of the
guided target). Golden Noise's re-denoise sampling inverts its one step itself
(`noiserefine.npnet_pairs.redenoise`): it queries the model where the step starts, not at the
target timestep as `ddim_invert` does, and shares only `to_eps_x0` with this module.
"""

from __future__ import annotations

import torch

from noiserefine.backbones.base import Backbone, Cond
from noiserefine.errors import NoiseRefineError
from noiserefine.guidance import UNGUIDED, guided_prediction
from noiserefine.sampling import make_scheduler


def to_eps_x0(out: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, prediction_type: str):
    """Convert a model output to (epsilon, x_0) at noise level alpha_bar = `alpha`."""
    a, s = alpha.sqrt(), (1 - alpha).sqrt()
    if prediction_type == "epsilon":
        eps = out
    elif prediction_type == "v_prediction":
        eps = a * out + s * x
    elif prediction_type == "sample":
        return (x - a * out) / s, out
    else:
        raise NoiseRefineError(f"unsupported prediction type {prediction_type!r}; expected epsilon, "
                               "v_prediction or sample")
    return eps, (x - s * eps) / a


@torch.no_grad()
def ddim_invert(backbone: Backbone, x_0: torch.Tensor, cond: Cond, *, steps: int = 20) -> torch.Tensor:
    """Invert unguided along the DDIM grid of `steps` that the sampler visits (the model's own
    timestep spacing, `sampling.make_scheduler`), from the clean end upwards.

    The model is queried at the target timestep of each step (the usual DDIM-inversion
    approximation). Returns unit-variance-scale noise.
    """
    sched = make_scheduler("ddim", backbone.scheduler_config)
    sched.set_timesteps(steps, device=x_0.device)
    ascending = sched.timesteps.flip(0)
    alphas = sched.alphas_cumprod.to(x_0.device, torch.float32)
    levels = [sched.final_alpha_cumprod.to(x_0.device)] + [alphas[t] for t in ascending]
    pred_type = backbone.scheduler_config.get("prediction_type", "epsilon")
    x = x_0
    for i, t in enumerate(ascending):
        a_prev, a_next = levels[i], levels[i + 1]
        out = guided_prediction(backbone, x, t, cond, None, UNGUIDED).float()
        eps, _ = to_eps_x0(out, x.float(), a_next, pred_type)
        x0 = (x.float() - (1 - a_prev).sqrt() * eps) / a_prev.sqrt()
        x = (a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps).to(x_0.dtype)
    return x
