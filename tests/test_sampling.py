"""Sampler: analytic gradients on a linear denoiser, batch invariance, noise validation."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from torch import nn

from noiserefine.errors import NoiseRefineError
from noiserefine.guidance import Guidance
from noiserefine.sampling import check_noise, denoise, make_scheduler, noise_for_seeds, seeds_from_range

SCHED = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
         "beta_end": 0.012, "prediction_type": "epsilon"}


class LinearBackbone:
    """eps(x_t, t) = k(t) * x_t: DDIM trajectories and their Jacobians have closed forms."""

    scheduler_config = SCHED
    latent_shape = (1, 4, 4)
    dtype = torch.float32
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.denoiser = nn.Identity()

    @staticmethod
    def k(t) -> float:
        return 0.3 + float(t) / 2000

    def encode_prompts(self, prompts):
        return {"c": torch.zeros(len(prompts), 1)}

    def predict(self, x_t, t, cond):
        return self.k(t) * x_t

    def perturbed_attention(self, mask):
        return nullcontext()

    def decode(self, x):
        return x


def _ddim_coeffs(steps: int):
    sched = make_scheduler("ddim", SCHED)
    sched.set_timesteps(steps)
    a = sched.alphas_cumprod.double()
    out = []
    for i, t in enumerate(sched.timesteps):
        a_t = a[t]
        a_prev = a[sched.timesteps[i + 1]] if i + 1 < steps else sched.final_alpha_cumprod.double()
        c1 = (a_prev / a_t).sqrt()  # d x_prev / d x with eps held fixed
        c2 = (1 - a_prev).sqrt() - (a_prev / a_t).sqrt() * (1 - a_t).sqrt()  # d x_prev / d eps
        out.append((int(t), c1, c2))
    return out, a[sched.timesteps[0]], sched.final_alpha_cumprod.double()


@pytest.mark.parametrize("steps", [1, 4, 10])
def test_msd_gradient_is_closed_form_on_linear_denoiser(steps):
    """Eq. 5 drops the model Jacobian: dL/dx_T = sqrt(alpha_final / alpha_T) * (x_0 - y) (cf. Eq. 29)."""
    bb = LinearBackbone()
    x_T = torch.randn(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    x0 = denoise(bb, make_scheduler("ddim", SCHED), x_T, bb.encode_prompts(["", ""]), steps=steps, grad_mode="msd")
    (0.5 * (x0 - y).pow(2).sum()).backward()
    _, a_T, a_final = _ddim_coeffs(steps)
    expected = (a_final / a_T).sqrt() * (x0.detach() - y)
    torch.testing.assert_close(x_T.grad, expected, rtol=1e-6, atol=1e-9)  # scheduler coefficients are float32


@pytest.mark.parametrize("steps", [1, 4])
def test_full_gradient_is_closed_form_on_linear_denoiser(steps):
    """Eq. 3 keeps the Jacobian: dx_0/dx_T = prod_t (c1_t + c2_t * k(t))."""
    bb = LinearBackbone()
    x_T = torch.randn(1, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    x0 = denoise(bb, make_scheduler("ddim", SCHED), x_T, bb.encode_prompts([""]), steps=steps, grad_mode="full")
    x0.sum().backward()
    coeffs, _, _ = _ddim_coeffs(steps)
    factor = torch.prod(torch.stack([c1 + c2 * bb.k(t) for t, c1, c2 in coeffs]))
    torch.testing.assert_close(x_T.grad, torch.full_like(x_T, float(factor)), rtol=1e-6, atol=1e-9)  # scheduler coefficients are float32
    torch.testing.assert_close(x0.detach(), factor * x_T.detach(), rtol=1e-6, atol=1e-9)  # scheduler coefficients are float32


def test_none_mode_builds_no_graph():
    bb = LinearBackbone()
    x_T = torch.randn(1, 1, 4, 4, requires_grad=True)
    x0 = denoise(bb, make_scheduler("ddim", SCHED), x_T, bb.encode_prompts([""]), steps=2)
    assert not x0.requires_grad


def test_msd_keeps_model_outputs_out_of_the_graph(tiny_shapes16):
    """With grad_mode='msd' no gradient reaches the denoiser's weights; with 'full' it does."""
    bb = tiny_shapes16
    cond = {k: v.detach() for k, v in bb.encode_prompts(["a red circle on the left"]).items()}
    for mode, expect in (("msd", False), ("full", True)):
        bb.denoiser.zero_grad(set_to_none=True)
        x_T = noise_for_seeds([0], bb.latent_shape).requires_grad_(True)
        x0 = denoise(bb, make_scheduler("ddim", bb.scheduler_config), x_T, cond, steps=2, grad_mode=mode)
        x0.sum().backward()
        got = any(p.grad is not None for p in bb.denoiser.parameters())
        assert got is expect and x_T.grad is not None


def test_same_seed_same_image_at_batch_1_and_8(tiny_shapes16):
    bb = tiny_shapes16
    prompts = ["a red circle on the left", "a blue square on the top"] * 4
    seeds = list(range(10, 18))
    x_T = noise_for_seeds(seeds, bb.latent_shape)
    torch.testing.assert_close(noise_for_seeds([seeds[3]], bb.latent_shape), x_T[3:4], rtol=0, atol=0)
    g = Guidance(cfg=3.0, pag=1.0)

    def run(idx):
        return denoise(bb, make_scheduler("ddim", bb.scheduler_config), x_T[idx],
                       bb.encode_prompts([prompts[i] for i in idx]),
                       uncond=bb.encode_prompts([""] * len(idx)), guidance=g, steps=4)

    full = run(list(range(8)))
    for i in (0, 3, 7):
        torch.testing.assert_close(run([i]), full[i: i + 1], rtol=0, atol=1e-4)  # float32 batch-size rounding


@pytest.mark.parametrize("bad, msg", [
    (torch.zeros(1, 3, 8, 8), "shape"),
    (torch.zeros(3, 16, 16), "shape"),
    (torch.zeros(1, 3, 16, 16, dtype=torch.long), "floating-point"),
    (torch.full((1, 3, 16, 16), float("nan")), "NaN"),
])
def test_bad_noise_is_refused(bad, msg):
    with pytest.raises(NoiseRefineError, match=msg):
        check_noise(bad, (3, 16, 16))


def test_scheduler_names_and_seed_ranges():
    with pytest.raises(NoiseRefineError, match="unknown scheduler"):
        make_scheduler("heun", SCHED)
    assert seeds_from_range("3-5") == [3, 4, 5] and seeds_from_range("1,9") == [1, 9]
    with pytest.raises(NoiseRefineError):
        seeds_from_range("a-b")


@pytest.mark.parametrize("name", ["ddim", "euler", "dpm++"])
def test_schedulers_follow_the_models_spacing(name):
    """Timestep spacing and offset are the model's (as diffusers' `from_config` of the pipeline's
    scheduler config gives them), unless `spacing` names one; trailing starts every sampler at T."""
    def first_steps(config, spacing=None):
        sched = make_scheduler(name, config, spacing)
        sched.set_timesteps(10)
        return [round(float(t)) for t in sched.timesteps[:2]]

    trailing = {**SCHED, "timestep_spacing": "trailing"}
    leading = {**SCHED, "timestep_spacing": "leading", "steps_offset": 1}  # SD 2.1's
    assert first_steps(trailing) == first_steps(SCHED, "trailing") == [999, 899]
    assert first_steps(leading) == {"ddim": [901, 801], "euler": [901, 801], "dpm++": [901, 811]}[name]  # diffusers' rules
    assert first_steps(leading, "trailing") == [999, 899]
