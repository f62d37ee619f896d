"""Section-5 analysis tools: analytic checks of the frequency tools, slerp and the x0-trajectory."""

from __future__ import annotations

import pytest
import torch

from noiserefine.analysis import energy_below, keep_band, radial_power, slerp, x0_trajectory
from noiserefine.errors import NoiseRefineError
from noiserefine.generation import SamplingOptions
from noiserefine.sampling import make_scheduler, noise_for_seeds


def test_bands_that_tile_the_radius_add_up_to_the_signal():
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for cutoff in (0.1, 0.3, 0.7):
        torch.testing.assert_close(keep_band(x, 0, cutoff) + keep_band(x, cutoff, 1), x, rtol=0, atol=1e-5)
    tenths = sum(keep_band(x, k / 10, (k + 1) / 10) for k in range(10))
    torch.testing.assert_close(tenths, x, rtol=0, atol=1e-5)
    with pytest.raises(NoiseRefineError, match="0 <= lo < hi"):
        keep_band(x, 0.5, 0.5)


def test_constant_image_lives_in_the_lowest_ring_and_band():
    power = radial_power(torch.ones(1, 1, 16, 16))
    assert power[0] > 0 and all(p < 1e-12 for p in power[1:])
    assert energy_below(torch.ones(1, 1, 16, 16), [0.01, 0.05]) == pytest.approx([1.0, 1.0])


def test_white_noise_has_a_flat_spectrum_and_checkerboard_is_highest_frequency():
    noise = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    power = radial_power(noise)
    assert power.max() / power.min() < 1.5  # white: equal power per frequency, up to sampling error
    i, j = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    checker = ((i + j) % 2 * 2 - 1).float()[None, None]
    assert keep_band(checker, 0, 0.5).abs().max() < 1e-5  # the Nyquist pattern has no low-frequency content
    assert energy_below(checker, [0.5, 0.99])[0] == pytest.approx(0.0, abs=1e-9)


def test_slerp_ends_at_its_inputs_and_keeps_the_norm_of_orthogonal_noises():
    a = torch.zeros(1, 2, 2, 2)
    b = torch.zeros(1, 2, 2, 2)
    a.view(-1)[0], b.view(-1)[1] = 3.0, 3.0  # orthogonal, both of norm 3
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    middle = slerp(a, b, 0.5)
    assert float(middle.norm()) == pytest.approx(3.0)  # a straight line would give 3 / sqrt(2)
    assert float(middle.view(-1)[0]) == pytest.approx(float(middle.view(-1)[1]))


def test_x0_trajectory_records_each_step_starting_from_the_first_prediction(tiny_shapes16):
    """Step 0's x0-prediction of a v-prediction model at t = T on a zero-terminal-SNR schedule is
    sqrt(a_T) x_T - sqrt(1 - a_T) v(x_T, T): computed here from the model by hand."""
    bb = tiny_shapes16
    x_T = noise_for_seeds([0, 1], bb.latent_shape)
    prompts = ["a red circle on the left", "a blue square on the top"]
    traj = x0_trajectory(bb, x_T, prompts, SamplingOptions(steps=4))
    assert traj.shape == (4, 2, *bb.latent_shape)
    sched = make_scheduler("ddim", bb.scheduler_config)
    sched.set_timesteps(4)
    t = sched.timesteps[0]
    alpha = sched.alphas_cumprod[int(t)]
    with torch.no_grad():
        v = bb.predict(x_T, t, bb.encode_prompts(prompts))
    torch.testing.assert_close(traj[0], alpha.sqrt() * x_T - (1 - alpha).sqrt() * v, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(traj[0], traj[-1])
    with pytest.raises(NoiseRefineError, match="no x0-prediction per step"):
        x0_trajectory(bb, x_T, prompts, SamplingOptions(steps=2, scheduler="dpm++"))
