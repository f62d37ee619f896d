"""Guidance intervals: diffusers' guider step rule, the sampler, model-evaluation counts, bad input."""

from __future__ import annotations

import logging

import pytest
import torch

from noiserefine.errors import NoiseRefineError
from noiserefine.evaluation.bench import parse_row
from noiserefine.guidance import UNGUIDED, Guidance, guided_prediction
from noiserefine.sampling import denoise, make_scheduler, noise_for_seeds


def test_interval_follows_diffusers_guider_rule():
    from diffusers.guiders import ClassifierFreeGuidance

    logging.getLogger("diffusers").setLevel(logging.ERROR)  # guiders warn that they are experimental
    for start, stop in [(0.0, 1.0), (0.4, 1.0), (0.25, 0.75), (0.0, 0.3), (0.33, 0.66)]:
        oracle = ClassifierFreeGuidance(guidance_scale=2.0, start=start, stop=stop)
        ours = Guidance(cfg=2.0, start=start, stop=stop)
        for n in (1, 5, 7, 20, 50):
            for i in range(n):
                oracle.set_state(step=i, num_inference_steps=n, timestep=torch.tensor(0))
                assert ours.active(i, n) == oracle._is_cfg_enabled(), (start, stop, n, i)


def test_sampler_with_interval_is_unguided_then_guided(tiny_shapes16):
    """Reference: the sampler loop written out by hand, unguided for steps 0..k-1, CFG+PAG after."""
    bb, steps, k = tiny_shapes16, 6, 3
    prompts = ["a red circle on the left", "a blue square on the top"]
    cond, uncond = bb.encode_prompts(prompts), bb.encode_prompts(["", ""])
    x_T = noise_for_seeds([1, 2], bb.latent_shape)
    guided = Guidance(cfg=3.0, pag=1.0)
    got = denoise(bb, make_scheduler("ddim", bb.scheduler_config), x_T, cond, uncond=uncond, steps=steps,
                  guidance=Guidance(cfg=3.0, pag=1.0, start=k / steps))
    sched = make_scheduler("ddim", bb.scheduler_config)
    sched.set_timesteps(steps)
    x = x_T.clone()
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            out = guided_prediction(bb, x, t, cond, uncond, guided if i >= k else UNGUIDED)
            x = sched.step(out, t, x, return_dict=False)[0]
    torch.testing.assert_close(got, x, rtol=0, atol=1e-6)
    full = denoise(bb, make_scheduler("ddim", bb.scheduler_config), x_T, cond, uncond=uncond, steps=steps,
                   guidance=guided)
    assert not torch.allclose(got, full, atol=1e-4)  # the interval changed something


def test_model_evaluations_and_names():
    assert Guidance(cfg=2.0).nfe(20) == 40 and UNGUIDED.nfe(20) == 20
    assert Guidance(cfg=2.0, start=0.4).nfe(20) == 8 + 12 * 2
    assert Guidance(cfg=2.0, pag=3.0, stop=0.5).nfe(10) == 5 * 3 + 5
    assert Guidance(cfg=2.0, start=0.4).name == "cfg2[0.4-1]" and Guidance(cfg=2.0).name == "cfg2"
    assert not Guidance(start=0.5).limited  # an interval of nothing is still unguided
    spec = parse_row("gaussian@cfg2+start0.4")
    assert spec.guidance == Guidance(cfg=2.0, start=0.4) and spec.label == "gaussian (cfg2[0.4-1])"


@pytest.mark.parametrize("start, stop", [(0.5, 0.5), (0.6, 0.4), (-0.1, 1.0), (0.0, 1.5), (float("nan"), 1.0)])
def test_bad_interval_is_refused(start, stop):
    with pytest.raises(NoiseRefineError, match="guidance"):
        Guidance(cfg=2.0, start=start, stop=stop)


def test_bad_interval_in_a_bench_row_fails_before_any_row_runs():
    with pytest.raises(NoiseRefineError, match="guidance interval"):
        parse_row("gaussian@cfg2+start0.8+stop0.2")


def test_bench_row_with_an_interval(tmp_path):
    import json

    from noiserefine.evaluation.bench import run_bench

    run_bench(tmp_path, n=4, batch_size=4, rows="gaussian@cfg2+steps2,gaussian@cfg2+steps2+start0.5", progress=False)
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    full, interval = rows
    assert full["nfe_per_image"] == 4 and interval["nfe_per_image"] == 3  # step 0 unguided, step 1 CFG
    assert interval["row"] == "gaussian (cfg2[0.5-1], 2 steps)" and interval["guidance_start"] == 0.5
    assert json.loads((tmp_path / "bench.json").read_text())["meta"]["reference_row"] == full["row"]
