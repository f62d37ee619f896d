"""Oracle tests: our sampler + StableDiffusionBackbone against diffusers' own SD pipelines.

Same tiny seeded components, same unit-variance latents (both sides multiply by
`init_noise_sigma`), same scheduler config; the full latent tensor must agree. The tolerance is
float32 round-off: both sides run the same ops in the same batch layout ([uncond | cond | perturbed]),
so anything above ATOL is a real difference (wrong guidance formula, branch order, perturbed
entries, timesteps, noise scaling), never noise.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPAGPipeline,
    StableDiffusionPipeline,
)
from sd_components import make_tiny_sd_pipe, tiny_sd_components

from noiserefine.backbones import Backbone
from noiserefine.backbones.pag import matches_layer
from noiserefine.backbones.stable_diffusion import StableDiffusionBackbone
from noiserefine.errors import NoiseRefineError
from noiserefine.guidance import Guidance
from noiserefine.io import state_hash
from noiserefine.sampling import denoise, make_scheduler

ATOL = 1e-4  # on latents of magnitude ~1-15 (init_noise_sigma ~14.6 for Euler)
RTOL = 0.0
PROMPTS = ["a red circle on the left", "a blue square on the top"]
RESOLUTION = 32  # pixels -> 16x16 latents, 4x cheaper than the default 64 (tested once below)

# The pipeline's scheduler is spelled out independently of `make_scheduler`, as a user would.
PIPE_SCHEDULERS = {
    "ddim": lambda cfg: DDIMScheduler.from_config(cfg, timestep_spacing="trailing", clip_sample=False,
                                                  set_alpha_to_one=False),
    "euler": lambda cfg: EulerDiscreteScheduler.from_config(cfg, timestep_spacing="trailing"),
    "dpm++": lambda cfg: DPMSolverMultistepScheduler.from_config(cfg, timestep_spacing="trailing",
                                                                 algorithm_type="dpmsolver++", solver_order=2),
}
GUIDANCES = [Guidance(1.0, 0.0), Guidance(5.0, 0.0), Guidance(1.0, 3.0), Guidance(5.0, 3.0)]


@pytest.fixture(scope="module")
def components():
    """Components the diffusers pipelines run on, with diffusers' own attention processors."""
    return tiny_sd_components()


@pytest.fixture(scope="module")
def backbone():
    """Identically seeded but separate modules (ours carry the mask-aware PAG processors)."""
    return StableDiffusionBackbone.from_pipeline(make_tiny_sd_pipe(), resolution=RESOLUTION)


def unit_noise(batch: int, size: int = RESOLUTION // 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(seed))


def run_pipeline(components, scheduler, prompts, x, steps, guidance: Guidance, **kw) -> torch.Tensor:
    """diffusers: the plain SD pipeline without PAG, the SD PAG pipeline (layers "mid") with it."""
    parts = {**components, "scheduler": scheduler}
    if guidance.uses_pag:
        pipe = StableDiffusionPAGPipeline(**parts, pag_applied_layers=["mid"])
        kw["pag_scale"] = guidance.pag
    else:
        pipe = StableDiffusionPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    size = x.shape[-1] * pipe.vae_scale_factor
    return pipe(prompts, latents=x.clone(), num_inference_steps=steps, guidance_scale=guidance.cfg,
                height=size, width=size, **kw).images


def run_ours(backbone, scheduler, prompts, x, steps, guidance: Guidance) -> torch.Tensor:
    with torch.no_grad():
        cond = backbone.encode_prompts(prompts)
        uncond = backbone.encode_prompts([""] * len(prompts)) if guidance.uses_uncond else None
    return denoise(backbone, scheduler, x, cond, steps=steps, uncond=uncond, guidance=guidance)


# -- sampling oracles --------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [2, 3])
@pytest.mark.parametrize("guidance", GUIDANCES, ids=lambda g: g.name)
@pytest.mark.parametrize("scheduler", sorted(PIPE_SCHEDULERS))
def test_denoise_matches_pipeline(components, backbone, scheduler, guidance, steps):
    x = unit_noise(1)
    expected = run_pipeline(components, PIPE_SCHEDULERS[scheduler](backbone.scheduler_config), PROMPTS[:1], x,
                            steps, guidance, output_type="latent")
    ours = run_ours(backbone, make_scheduler(scheduler, backbone.scheduler_config), PROMPTS[:1], x, steps, guidance)
    assert ours.shape == expected.shape == (1, *backbone.latent_shape)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=RTOL)


def test_batch_of_two_prompts_matches_pipeline_and_single_runs(components, backbone):
    guidance, steps = Guidance(5.0, 3.0), 3
    x = unit_noise(2)
    expected = run_pipeline(components, PIPE_SCHEDULERS["dpm++"](backbone.scheduler_config), PROMPTS, x,
                            steps, guidance, output_type="latent")
    ours = run_ours(backbone, make_scheduler("dpm++", backbone.scheduler_config), PROMPTS, x, steps, guidance)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=RTOL)
    assert (ours[0] - ours[1]).abs().max() > 0.1


def test_sample_does_not_depend_on_its_batch():
    """Each entry of a CFG+PAG batch equals its own batch-of-one run (no mask or branch leaks).

    Run in float64: in float32, CPU kernels block differently for batch 6 and 3, a ~1e-6 relative
    round-off per forward that CFG 5 + PAG 3 amplifies to ~1e-4 on latents of size ~60; in float64
    the difference is ~1e-13, so a tight tolerance here tests the logic, not the kernels."""
    backbone = StableDiffusionBackbone.from_pipeline(make_tiny_sd_pipe().to(torch.float64), resolution=RESOLUTION)
    guidance, steps = Guidance(5.0, 3.0), 3
    x = unit_noise(2).to(torch.float64)
    both = run_ours(backbone, make_scheduler("dpm++", backbone.scheduler_config), PROMPTS, x, steps, guidance)
    for i in range(2):
        alone = run_ours(backbone, make_scheduler("dpm++", backbone.scheduler_config), PROMPTS[i:i + 1],
                         x[i:i + 1], steps, guidance)
        torch.testing.assert_close(both[i:i + 1], alone, atol=1e-9, rtol=0.0)


def test_decode_at_default_resolution_matches_pipeline_images(components):
    backbone = StableDiffusionBackbone.from_pipeline(make_tiny_sd_pipe())
    assert backbone.resolution == (64, 64) and backbone.latent_shape == (4, 32, 32)
    x = unit_noise(1, size=32)
    expected = run_pipeline(components, PIPE_SCHEDULERS["ddim"](backbone.scheduler_config), PROMPTS[:1], x,
                            2, Guidance(), output_type="pt")
    with torch.no_grad():
        latents = run_ours(backbone, make_scheduler("ddim", backbone.scheduler_config), PROMPTS[:1], x, 2, Guidance())
        images = backbone.decode(latents)
    assert images.shape == (1, 3, 64, 64)
    # The pipeline's "pt" output is the decoded image mapped from [-1, 1] to [0, 1].
    torch.testing.assert_close((images / 2 + 0.5).clamp(0, 1), expected, atol=ATOL, rtol=RTOL)


# -- prompts, PAG mask, identity -----------------------------------------------------------------
def test_encode_prompts_matches_pipeline(components, backbone):
    tokenizer = components["tokenizer"]
    assert len(set(tokenizer(PROMPTS[0]).input_ids)) > 3  # a real vocabulary, not the 3-token fallback
    pipe = StableDiffusionPipeline(**components)
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(PROMPTS, torch.device("cpu"), 1, True)
        ours = backbone.encode_prompts(PROMPTS)["encoder_hidden_states"]
        ours_uncond = backbone.encode_prompts(["", ""])["encoder_hidden_states"]
    assert ours.shape == (2, tokenizer.model_max_length, 32)
    torch.testing.assert_close(ours, cond, atol=0.0, rtol=0.0)
    torch.testing.assert_close(ours_uncond, uncond, atol=0.0, rtol=0.0)
    assert not torch.equal(ours[0], ours[1])


def test_pag_mask_perturbs_only_masked_entries(backbone):
    x = unit_noise(2, seed=1)
    t = torch.tensor(999)
    with torch.no_grad():
        cond = backbone.encode_prompts(PROMPTS)
        plain = backbone.predict(x, t, cond)
        with backbone.perturbed_attention(torch.tensor([False, True])):
            mixed = backbone.predict(x, t, cond)
        with backbone.perturbed_attention(torch.tensor([True, True])):
            both = backbone.predict(x, t, cond)
    torch.testing.assert_close(mixed[0], plain[0], atol=1e-5, rtol=0.0)
    torch.testing.assert_close(mixed[1], both[1], atol=1e-5, rtol=0.0)
    assert (mixed[1] - plain[1]).abs().max() > 1e-3  # the perturbation is real
    with torch.no_grad():  # the context restores the unperturbed model
        torch.testing.assert_close(backbone.predict(x, t, cond), plain, atol=0.0, rtol=0.0)


def test_matches_layer_does_not_confuse_block_indices():
    assert not matches_layer("blocks.1", "blocks.10.attn1")
    assert matches_layer("blocks.1", "blocks.1.attn1")
    assert matches_layer("mid", "mid_block.attentions.0.transformer_blocks.0.attn1")


def test_protocol_fingerprint_and_errors(backbone):
    assert isinstance(backbone, Backbone)
    fp = backbone.fingerprint()
    assert fp["architecture"].startswith("sd-unet-")
    assert fp["weights_sha256"] == state_hash(backbone.denoiser)
    twin = StableDiffusionBackbone.from_pipeline(make_tiny_sd_pipe())
    assert twin.fingerprint() == fp
    changed = make_tiny_sd_pipe()
    with torch.no_grad():
        changed.unet.conv_in.bias.add_(1e-3)
    assert StableDiffusionBackbone.from_pipeline(changed).fingerprint()["weights_sha256"] != fp["weights_sha256"]
    with pytest.raises(NoiseRefineError, match="multiples"):
        StableDiffusionBackbone.from_pipeline(make_tiny_sd_pipe(), resolution=33)
    with pytest.raises(NoiseRefineError, match="no self-attention layer"):
        StableDiffusionBackbone.from_pipeline(make_tiny_sd_pipe(), pag_layers=("nonexistent",))


def test_from_pretrained_loads_a_saved_pipeline(tmp_path, tiny_sd_pipe):
    tiny_sd_pipe.save_pretrained(tmp_path)
    loaded = StableDiffusionBackbone.from_pretrained(str(tmp_path), resolution=RESOLUTION)
    reference = StableDiffusionBackbone.from_pipeline(tiny_sd_pipe, resolution=RESOLUTION)
    assert loaded.fingerprint() == reference.fingerprint()
    assert loaded.scheduler_config["timestep_spacing"] == "trailing"
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_prompts(PROMPTS)["encoder_hidden_states"],
                                   reference.encode_prompts(PROMPTS)["encoder_hidden_states"], atol=0.0, rtol=0.0)
