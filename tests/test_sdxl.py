"""SDXL backbone: oracle tests against diffusers' StableDiffusionXL(PAG)Pipeline on tiny seeded
components, and targets -> 2 training steps -> a refined sample.

Tolerance as in test_oracle_sd.py: float32 round-off of the same ops in the same batch layout.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionXLPAGPipeline, StableDiffusionXLPipeline
from sd_components import make_tiny_sdxl_pipe, tiny_sdxl_components

from noiserefine.backbones import Backbone
from noiserefine.backbones.loading import load_backbone
from noiserefine.backbones.sdxl import StableDiffusionXLBackbone
from noiserefine.backbones.stable_diffusion import StableDiffusionBackbone
from noiserefine.errors import NoiseRefineError
from noiserefine.guidance import Guidance, Teacher
from noiserefine.methods.refine import NoiseRefiner
from noiserefine.sampling import denoise, make_scheduler
from noiserefine.targets import TargetSpec, generate_targets, load_targets
from noiserefine.train import TrainConfig, train_refiner

ATOL, RTOL = 1e-4, 0.0
PROMPTS = ["a red circle on the left", "a blue square on the top"]
RESOLUTION = 32  # 16x16 latents
PIPE_SCHEDULERS = {
    "ddim": lambda cfg: DDIMScheduler.from_config(cfg, timestep_spacing="trailing", clip_sample=False,
                                                  set_alpha_to_one=False),
    "euler": lambda cfg: EulerDiscreteScheduler.from_config(cfg, timestep_spacing="trailing"),
}


@pytest.fixture(scope="module")
def backbone():
    return StableDiffusionXLBackbone.from_pipeline(make_tiny_sdxl_pipe(), resolution=RESOLUTION)


def unit_noise(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 4, RESOLUTION // 2, RESOLUTION // 2, generator=torch.Generator().manual_seed(seed))


def run_pipeline(scheduler_name: str, prompts, x, steps, guidance: Guidance, force_zeros=True, **kw):
    """diffusers on its own (identically seeded) components and attention processors."""
    parts = tiny_sdxl_components(force_zeros)
    parts["scheduler"] = PIPE_SCHEDULERS[scheduler_name](parts["scheduler"].config)
    if guidance.uses_pag:
        pipe = StableDiffusionXLPAGPipeline(**parts, pag_applied_layers=["mid"])
        kw["pag_scale"] = guidance.pag
    else:
        pipe = StableDiffusionXLPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompts, latents=x.clone(), num_inference_steps=steps, guidance_scale=guidance.cfg,
                height=RESOLUTION, width=RESOLUTION, **kw).images


def run_ours(backbone, scheduler_name, prompts, x, steps, guidance: Guidance) -> torch.Tensor:
    with torch.no_grad():
        cond = backbone.encode_prompts(prompts)
        uncond = backbone.encode_prompts([""] * len(prompts)) if guidance.uses_uncond else None
    sched = make_scheduler(scheduler_name, backbone.scheduler_config)
    return denoise(backbone, sched, x, cond, steps=steps, uncond=uncond, guidance=guidance)


# -- oracles ------------------------------------------------------------------------------------
@pytest.mark.parametrize("guidance", [Guidance(1.0), Guidance(5.0), Guidance(5.0, 3.0)], ids=lambda g: g.name)
@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_denoise_matches_sdxl_pipeline(backbone, scheduler, guidance):
    x = unit_noise(1)
    expected = run_pipeline(scheduler, PROMPTS[:1], x, 2, guidance, output_type="latent")
    ours = run_ours(backbone, scheduler, PROMPTS[:1], x, 2, guidance)
    assert ours.shape == expected.shape == (1, *backbone.latent_shape)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=RTOL)


def test_cfg_without_force_zeros_encodes_the_empty_prompt():
    backbone = StableDiffusionXLBackbone.from_pipeline(make_tiny_sdxl_pipe(False), resolution=RESOLUTION)
    x = unit_noise(2, seed=3)
    expected = run_pipeline("ddim", PROMPTS, x, 2, Guidance(5.0), force_zeros=False, output_type="latent")
    ours = run_ours(backbone, "ddim", PROMPTS, x, 2, Guidance(5.0))
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=RTOL)
    with torch.no_grad():
        assert backbone.encode_prompts([""])["text_embeds"].abs().max() > 0  # really encoded, not zeros


def test_encode_prompts_matches_pipeline(backbone):
    pipe = StableDiffusionXLPipeline(**tiny_sdxl_components())
    with torch.no_grad():
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, device=torch.device("cpu"))
        ours = backbone.encode_prompts(PROMPTS)
        ours_uncond = backbone.encode_prompts(["", ""])
    assert ours["encoder_hidden_states"].shape == (2, 77, 64) and ours["text_embeds"].shape == (2, 32)
    torch.testing.assert_close(ours["encoder_hidden_states"], embeds, atol=0.0, rtol=0.0)
    torch.testing.assert_close(ours["text_embeds"], pooled, atol=0.0, rtol=0.0)
    torch.testing.assert_close(ours_uncond["encoder_hidden_states"], neg, atol=0.0, rtol=0.0)  # zeros
    torch.testing.assert_close(ours_uncond["text_embeds"], neg_pooled, atol=0.0, rtol=0.0)
    expected_ids = pipe._get_add_time_ids((RESOLUTION, RESOLUTION), (0, 0), (RESOLUTION, RESOLUTION),
                                          dtype=torch.float32, text_encoder_projection_dim=32)
    torch.testing.assert_close(ours["time_ids"], expected_ids.expand(2, -1), atol=0.0, rtol=0.0)


def test_decode_matches_pipeline_images(backbone):
    x = unit_noise(1, seed=5)
    expected = run_pipeline("ddim", PROMPTS[:1], x, 2, Guidance(), output_type="pt")
    with torch.no_grad():
        images = backbone.decode(run_ours(backbone, "ddim", PROMPTS[:1], x, 2, Guidance()))
    assert images.shape == (1, 3, RESOLUTION, RESOLUTION)
    torch.testing.assert_close((images / 2 + 0.5).clamp(0, 1), expected, atol=ATOL, rtol=RTOL)


def test_protocol_errors_and_loading(tmp_path, backbone):
    assert isinstance(backbone, Backbone)
    assert backbone.fingerprint()["architecture"].startswith("sdxl-unet-")
    pipe = make_tiny_sdxl_pipe()
    with pytest.raises(NoiseRefineError, match="SD 1.x/2.x only"):
        StableDiffusionBackbone.from_pipeline(pipe)
    pipe.save_pretrained(tmp_path)
    loaded = load_backbone(str(tmp_path), resolution=RESOLUTION)
    assert type(loaded) is StableDiffusionXLBackbone
    assert loaded.fingerprint() == backbone.fingerprint()
    assert loaded.force_zeros_for_empty_prompt
    with pytest.raises(NoiseRefineError, match="list of prompts"):
        backbone.encode_prompts("a red circle")


# -- NoiseRefine end to end ---------------------------------------------------------------------
def test_targets_train_two_steps_and_refined_sample(tmp_path):
    backbone = StableDiffusionXLBackbone.from_pipeline(make_tiny_sdxl_pipe(), resolution=RESOLUTION)
    spec = TargetSpec(PROMPTS, [0, 1, 2, 3], Teacher(Guidance(cfg=7.0, pag=3.0), steps=2), shard_size=2)
    generate_targets(backbone, spec, tmp_path / "targets", batch_size=4, progress=False)
    data = load_targets(tmp_path / "targets")
    assert data.x_0[:].shape == (4, *backbone.latent_shape) and data.prompts[:2] == PROMPTS
    cfg = TrainConfig(steps=2, batch_size=2, lr=1e-2, msd_steps=2, rank=4, checkpoint_every=10,
                      gradient_checkpointing=True)  # each family supports it
    path = train_refiner(backbone, tmp_path / "targets", tmp_path / "run", cfg, progress=False)

    fresh = StableDiffusionXLBackbone.from_pipeline(make_tiny_sdxl_pipe(), resolution=RESOLUTION)
    refiner = NoiseRefiner.load(fresh, path)
    x = data.x_T[:2]
    with torch.no_grad():
        cond = fresh.encode_prompts(PROMPTS)
        refined = refiner(x, cond)
        sample = denoise(fresh, make_scheduler("ddim", fresh.scheduler_config), refined, cond, steps=2)
    assert refined.shape == x.shape and torch.isfinite(sample).all()
    assert (refined - x).abs().max() > 1e-4  # two steps at lr 1e-2 moved g_phi off the identity
