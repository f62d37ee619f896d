"""NoiseRefine's g_phi is evaluated ONCE at t = T (paper section 3.3), T the first timestep of the
sampler that starts from the noise. Oracle: a refiner whose delta head is a copy of the denoiser's
own output layer (LoRA still at its zero start) IS the denoiser, so its delta must equal the base
model's prediction at (x_T, T, c) -- and differs from the prediction at any other t."""

from __future__ import annotations

import torch

from noiserefine.methods.refine import NoiseRefiner
from noiserefine.sampling import make_scheduler, noise_for_seeds

PROMPTS = ["a red circle on the left", "a blue square on the top"]


def _first_sampler_timestep(backbone) -> torch.Tensor:
    sched = make_scheduler("ddim", backbone.scheduler_config)
    sched.set_timesteps(20)
    return sched.timesteps[0]


def test_refiner_delta_is_the_denoiser_at_the_first_sampler_timestep(tiny_shapes16):
    bb = tiny_shapes16.eval()
    refiner = NoiseRefiner(bb)
    with torch.no_grad():  # the head becomes the output layer itself: delta_phi = the denoiser's output
        refiner.delta_head.load_state_dict(bb.denoiser.get_submodule(refiner.config.output_layer).state_dict())
    x_T = noise_for_seeds([1, 2], bb.latent_shape)
    cond = bb.encode_prompts(PROMPTS)
    T = _first_sampler_timestep(bb)
    assert int(T) == bb.scheduler_config["num_train_timesteps"] - 1  # trailing spacing starts at T
    with torch.no_grad():
        delta = refiner.delta(x_T, cond)
        at_T = bb.predict(x_T, T, cond)
        at_500 = bb.predict(x_T, torch.tensor(500), cond)
    assert (at_T - at_500).abs().max() > 1e-3  # the oracle tells timesteps apart
    torch.testing.assert_close(delta, at_T, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # and the refined noise is x_T + s * that prediction
        torch.testing.assert_close(refiner(x_T, cond, strength=0.5), x_T + 0.5 * at_T, rtol=1e-5, atol=1e-5)
