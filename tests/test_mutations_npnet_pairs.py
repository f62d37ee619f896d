"""NPNet's pairs (Golden Noise, Stage I): x_T' = DDIM-Inversion_{w_w}(DDIM_{w_l}(x_T)), one DDIM step
at the HIGH CFG scale w_l from x_T, then that step inverted at the LOW scale w_w < w_l. Oracle: the
same two steps composed by hand from the model's raw predictions and the noise schedule, with the
paper's w_l / w_h scales in their places; the pair folder must hold exactly that."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from noiserefine.backbones.shapes16 import Shapes16Backbone
from noiserefine.npnet_pairs import RedenoiseSpec, collect_pairs, load_pairs, redenoise
from noiserefine.sampling import noise_for_seeds

PROMPTS = ["a red circle on the left", "a blue square on the top", "a green triangle on the right"]
HIGH, LOW, GRID = 4.0, 1.5, 4


@pytest.fixture(scope="module")
def backbone():
    return Shapes16Backbone.create(0).eval()


def _cfg(backbone, x, t, cond, uncond, w):
    """u + w (c - u) from two separate model calls."""
    u, c = backbone.predict(x, t, uncond), backbone.predict(x, t, cond)
    return u + w * (c - u)


@torch.no_grad()
def _redenoise_by_hand(backbone, x_T, prompts, w_high, w_low, grid):
    """DDIM (eta = 0, v-prediction) from T to t_1 at w_high, then t_1 -> T inverted at w_low with
    the model queried at (x_1, t_1); T and t_1 the first two timesteps of the trailing grid."""
    assert backbone.scheduler_config["prediction_type"] == "v_prediction"
    n = backbone.scheduler_config["num_train_timesteps"]
    t_T, t_1 = n - 1, round(n - n / grid) - 1  # trailing spacing
    abar = DDIMScheduler.from_config(backbone.scheduler_config).alphas_cumprod.double()
    cond, uncond = backbone.encode_prompts(prompts), backbone.encode_prompts([""] * len(prompts))

    def eps_x0(v, x, a):  # v = sqrt(a) eps - sqrt(1 - a) x0,  x = sqrt(a) x0 + sqrt(1 - a) eps
        return a.sqrt() * v + (1 - a).sqrt() * x, a.sqrt() * x - (1 - a).sqrt() * v

    x = x_T.double()
    eps, x0 = eps_x0(_cfg(backbone, x_T, torch.tensor(t_T), cond, uncond, w_high).double(), x, abar[t_T])
    x_1 = abar[t_1].sqrt() * x0 + (1 - abar[t_1]).sqrt() * eps
    v = _cfg(backbone, x_1.float(), torch.tensor(t_1), cond, uncond, w_low).double()
    eps, x0 = eps_x0(v, x_1, abar[t_1])
    return (abar[t_T].sqrt() * x0 + (1 - abar[t_T]).sqrt() * eps).float()


def _score(images, prompts):
    return torch.sigmoid(images[:, 0].mean((1, 2)))


def test_pairs_are_redenoised_high_scale_forward_low_scale_back(backbone, tmp_path):
    seeds = [3, 4, 5]
    spec = RedenoiseSpec(prompts=PROMPTS, seeds=seeds, high_cfg=HIGH, low_cfg=LOW, grid_steps=GRID,
                         filter_steps=1, shard_size=2, score="red")
    pairs = load_pairs(collect_pairs(backbone, spec, tmp_path / "pairs", _score, batch_size=2, progress=False),
                       margin=float("-inf"))  # keep every pair
    x_T = noise_for_seeds(seeds, backbone.latent_shape)
    expect = _redenoise_by_hand(backbone, x_T, PROMPTS, HIGH, LOW, GRID)
    swapped = _redenoise_by_hand(backbone, x_T, PROMPTS, LOW, HIGH, GRID)
    assert (expect - swapped).abs().max() > 1e-2  # the oracle tells the order of the scales apart
    assert pairs.prompts == PROMPTS and torch.equal(pairs.source, x_T)
    torch.testing.assert_close(pairs.target, expect, rtol=1e-4, atol=1e-4)


def test_redenoise_equals_the_hand_composed_steps(backbone):
    x_T = noise_for_seeds([7, 8], backbone.latent_shape)
    cond, uncond = backbone.encode_prompts(PROMPTS[:2]), backbone.encode_prompts(["", ""])
    got = redenoise(backbone, x_T, cond, uncond, high_cfg=HIGH, low_cfg=LOW, grid_steps=GRID)
    torch.testing.assert_close(got, _redenoise_by_hand(backbone, x_T, PROMPTS[:2], HIGH, LOW, GRID),
                               rtol=1e-4, atol=1e-4)
