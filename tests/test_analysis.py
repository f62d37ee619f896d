"""Section-5 analysis helpers: analytic checks of the frequency tools."""

from __future__ import annotations

import torch

from noiserefine.analysis import band_pass, radial_power


def test_low_and_high_bands_add_up_to_the_signal():
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for cutoff in (0.1, 0.3, 0.7):
        torch.testing.assert_close(band_pass(x, cutoff, "low") + band_pass(x, cutoff, "high"), x,
                                   rtol=0, atol=1e-5)


def test_constant_image_lives_in_the_lowest_ring():
    power = radial_power(torch.ones(1, 1, 16, 16))
    assert power[0] > 0 and all(p < 1e-12 for p in power[1:])


def test_white_noise_has_a_flat_spectrum_and_checkerboard_is_highest_frequency():
    noise = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    power = radial_power(noise)
    assert power.max() / power.min() < 1.5  # white: equal power per frequency, up to sampling error
    i, j = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    checker = ((i + j) % 2 * 2 - 1).float()[None, None]
    low = band_pass(checker, 0.5, "low")
    assert low.abs().max() < 1e-5  # the Nyquist pattern has no low-frequency content
