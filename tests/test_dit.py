"""DiT / SiT-style backbone: DiTPipeline's sampling math, SiT's flow conventions, PAG layers,
class prompts, and targets -> 2 training steps -> a refined sample, on tiny seeded components.

DiTPipeline has no `latents=`: we seed its generator and draw the same latents ourselves
(`randn_tensor` on a CPU generator is `torch.randn(shape, generator=g)`). It never multiplies the
latents by `init_noise_sigma`, so only schedulers with init_noise_sigma = 1 (DDIM, DPM++) are
compared. Tolerance: float32 round-off (the pipeline orders the CFG batch [cond | null], we
[null | cond]).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from sd_components import make_tiny_dit_pipe, tiny_dit, tiny_vae

from noiserefine.backbones import Backbone
from noiserefine.backbones.dit import DiTBackbone
from noiserefine.backbones.loading import load_backbone
from noiserefine.backbones.pag import MaskedIdentitySelfAttnProcessor
from noiserefine.errors import NoiseRefineError
from noiserefine.guidance import Guidance, Teacher, guided_prediction
from noiserefine.methods.refine import NoiseRefiner, RefinerConfig
from noiserefine.sampling import denoise, make_scheduler
from noiserefine.targets import TargetSpec, generate_targets, load_targets
from noiserefine.train import TrainConfig, train_refiner

ATOL, RTOL = 1e-4, 0.0
CLASSES = [1, 207]
PIPE_SCHEDULERS = {
    "ddim": lambda cfg: DDIMScheduler.from_config(cfg, timestep_spacing="trailing", clip_sample=False,
                                                  set_alpha_to_one=False),
    "dpm++": lambda cfg: DPMSolverMultistepScheduler.from_config(cfg, timestep_spacing="trailing",
                                                                 algorithm_type="dpmsolver++", solver_order=2),
}


@pytest.fixture(scope="module")
def backbone():
    return DiTBackbone.from_pipeline(make_tiny_dit_pipe())


def run_dit_pipeline(scheduler_name: str, labels, steps: int, cfg: float, seed: int) -> torch.Tensor:
    pipe = make_tiny_dit_pipe()
    pipe.scheduler = PIPE_SCHEDULERS[scheduler_name](pipe.scheduler.config)
    return pipe(labels, guidance_scale=cfg, generator=torch.Generator().manual_seed(seed),
                num_inference_steps=steps, output_type="pt").images


@pytest.mark.parametrize("cfg", [1.0, 4.0])
@pytest.mark.parametrize("scheduler", sorted(PIPE_SCHEDULERS))
def test_sampling_matches_dit_pipeline(backbone, scheduler, cfg):
    expected = run_dit_pipeline(scheduler, CLASSES, 3, cfg, seed=0)
    x = torch.randn(len(CLASSES), *backbone.latent_shape, generator=torch.Generator().manual_seed(0))
    guidance = Guidance(cfg)
    with torch.no_grad():
        cond = backbone.encode_prompts([str(c) for c in CLASSES])
        uncond = backbone.encode_prompts([""] * len(CLASSES))
        latents = denoise(backbone, make_scheduler(scheduler, backbone.scheduler_config), x, cond,
                          uncond=uncond, guidance=guidance, steps=3)
        images = (backbone.decode(latents) / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(images, expected, atol=ATOL, rtol=RTOL)


def test_cfg_changes_the_sample(backbone):
    guided, plain = run_dit_pipeline("ddim", CLASSES, 3, 4.0, 0), run_dit_pipeline("ddim", CLASSES, 3, 1.0, 0)
    assert (guided - plain).abs().max() > 1e-3


def test_flow_backbone_follows_sit_conventions():
    """A DiT folder with a FlowMatchEuler scheduler is SiT-style: our loop on diffusers' flow
    scheduler equals SiT's Euler ODE (noise at t = 0, data at t = 1, x += dt * v(x, t)) written
    directly on the raw transformer, with CFG on the velocity."""
    backbone = DiTBackbone.from_pipeline(make_tiny_dit_pipe(flow=True))
    assert backbone.flow and backbone.refiner_defaults["timestep"] == 1000
    net, w, steps = backbone.denoiser, 4.0, 4
    x0 = torch.randn(2, *backbone.latent_shape, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor(CLASSES)
    with torch.no_grad():
        sched = FlowMatchEulerDiscreteScheduler.from_config(backbone.scheduler_config)
        sched.set_timesteps(steps)
        cond, uncond = backbone.encode_prompts(["1", "207"]), backbone.encode_prompts(["", ""])
        ours = x0.clone()
        for t in sched.timesteps:
            ours = sched.step(guided_prediction(backbone, ours, t, cond, uncond, Guidance(w)), t, ours).prev_sample

        sit = x0.clone()
        ts = 1 - sched.sigmas  # SiT time, 0 -> 1
        null = torch.full_like(labels, 1000)
        for i in range(steps):
            t = ts[i].expand(2)
            v_c = net(sit, timestep=t, class_labels=labels).sample[:, :4]
            v_u = net(sit, timestep=t, class_labels=null).sample[:, :4]
            sit = sit + (ts[i + 1] - ts[i]) * (v_u + w * (v_c - v_u))
    torch.testing.assert_close(ours, sit, atol=1e-5, rtol=0.0)
    assert (ours - x0).abs().max() > 1e-2


# -- prompts, PAG, protocol ---------------------------------------------------------------------
def test_class_prompts(backbone):
    ids = backbone.encode_prompts(["1", "golden retriever", "tabby cat", ""])["class_labels"]
    assert ids.tolist() == [1, 1, 0, 1000]
    for bad, message in [("not a class", "unknown class"), ("1000", "out of range")]:
        with pytest.raises(NoiseRefineError, match=message):
            backbone.encode_prompts([bad])
    no_null = DiTBackbone(tiny_dit(), tiny_vae(), {})
    no_null.denoiser.transformer_blocks[0].norm1.emb.class_embedder.dropout_prob = 0.0
    no_null.denoiser.transformer_blocks[0].norm1.emb.class_embedder.embedding_table = torch.nn.Embedding(1000, 16)
    with pytest.raises(NoiseRefineError, match="no null class"):
        no_null.encode_prompts([""])


def test_train_mode_label_dropout_is_refused(backbone):
    backbone.denoiser.train()
    try:
        with pytest.raises(NoiseRefineError, match="training mode"):
            backbone.predict(torch.zeros(1, *backbone.latent_shape), torch.tensor(999),
                             backbone.encode_prompts(["1"]))
    finally:
        backbone.denoiser.eval()


def test_pag_layer_is_block_1_only_and_masks_per_sample():
    """`transformer_blocks.1` must not also select blocks 10-19 (diffusers' regex does)."""
    backbone = DiTBackbone(tiny_dit(num_layers=11), tiny_vae(), {})
    patched = [n for n, m in backbone.denoiser.named_modules()
               if isinstance(getattr(m, "processor", None), MaskedIdentitySelfAttnProcessor)]
    assert patched == ["transformer_blocks.1.attn1"]
    x = torch.randn(2, *backbone.latent_shape, generator=torch.Generator().manual_seed(2))
    t, cond = torch.tensor(500), backbone.encode_prompts(["1", "2"])
    with torch.no_grad():
        plain = backbone.predict(x, t, cond)
        with backbone.perturbed_attention(torch.tensor([False, True])):
            mixed = backbone.predict(x, t, cond)
    torch.testing.assert_close(mixed[0], plain[0], atol=1e-5, rtol=0.0)
    assert (mixed[1] - plain[1]).abs().max() > 1e-4


def test_protocol_and_loading(tmp_path, backbone):
    assert isinstance(backbone, Backbone)
    assert backbone.fingerprint()["architecture"].startswith("dit-") and backbone.latent_shape == (4, 8, 8)
    make_tiny_dit_pipe().save_pretrained(tmp_path / "dit")
    loaded = load_backbone(str(tmp_path / "dit"))
    assert type(loaded) is DiTBackbone and not loaded.flow
    assert loaded.fingerprint() == backbone.fingerprint()
    make_tiny_dit_pipe(flow=True).save_pretrained(tmp_path / "sit")
    sit = load_backbone(str(tmp_path / "sit"))
    assert sit.flow and sit.fingerprint()["architecture"].startswith("sit-")
    with pytest.raises(NoiseRefineError, match="no backbone for pipeline class"):
        from noiserefine.backbones.loading import adapter_class

        adapter_class("FluxPipeline")


# -- NoiseRefine end to end ---------------------------------------------------------------------
def test_targets_train_two_steps_and_refined_sample(tmp_path):
    backbone = DiTBackbone.from_pipeline(make_tiny_dit_pipe())
    spec = TargetSpec(["1", "2", "goldfish"], [0, 1, 2, 3], Teacher(Guidance(cfg=4.0), steps=3), shard_size=2)
    generate_targets(backbone, spec, tmp_path / "targets", batch_size=4, progress=False)
    data = load_targets(tmp_path / "targets")
    assert data.x_0[:].shape == (4, 4, 8, 8)
    cfg = TrainConfig(steps=2, batch_size=2, lr=1e-2, msd_steps=2, rank=4, checkpoint_every=10,
                      gradient_checkpointing=True)  # each family supports it
    path = train_refiner(backbone, tmp_path / "targets", tmp_path / "run", cfg, progress=False)

    fresh = DiTBackbone.from_pipeline(make_tiny_dit_pipe())
    refiner = NoiseRefiner.load(fresh, path)
    assert refiner.config.output_layer == "proj_out_2"
    with torch.no_grad():
        cond = fresh.encode_prompts(["1", "goldfish"])
        refined = refiner(data.x_T[:2], cond)
        sample = denoise(fresh, make_scheduler("ddim", fresh.scheduler_config), refined, cond, steps=3)
    assert torch.isfinite(sample).all() and (refined - data.x_T[:2]).abs().max() > 1e-4


def test_refiner_scale_conditioning_attaches_to_dit():
    backbone = DiTBackbone.from_pipeline(make_tiny_dit_pipe())
    refiner = NoiseRefiner(backbone, RefinerConfig(**backbone.refiner_defaults, rank=2, scale_conditioning=True))
    with torch.no_grad():
        refiner.scale_proj.weight.normal_()
        refiner.delta_head.weight.normal_()
        x, cond = torch.randn(1, 4, 8, 8), backbone.encode_prompts(["1"])
        a, b = refiner(x, cond, guidance_scale=2.0), refiner(x, cond, guidance_scale=6.0)
    assert (a - b).abs().max() > 1e-4  # the guidance scale reaches the output
