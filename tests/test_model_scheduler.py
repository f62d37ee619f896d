"""Targets and MSD training follow the model's own scheduler configuration (issue 14, item 5).

A tiny SD pipeline built from config with Stable Diffusion 2.1's scheduler configuration (DDIM,
no `timestep_spacing` key so DDIM's "leading", steps_offset 1, v-prediction): the targets must be
the pipeline's own guided samples (oracle: diffusers' pipeline on identically seeded components,
same scheduler, same latents), and training's inner sampler must visit the pipeline's timesteps.
The shapes16 side (trailing spacing, bench figures unmoved) is checked by the bench tests.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from sd_components import SCHEDULER_CONFIG, make_tiny_sd21_pipe, tiny_sd_components

from noiserefine.backbones.stable_diffusion import StableDiffusionBackbone
from noiserefine.errors import NoiseRefineError
from noiserefine.guidance import Guidance, Teacher
from noiserefine.sampling import noise_for_seeds
from noiserefine.targets import TargetSpec, generate_targets, load_targets
from noiserefine.train import TrainConfig, train_refiner

PROMPTS = ["a red circle on the left", "a blue square on the top"]
SIZE = 32  # pixels: 16 x 16 latents (the tiny VAE halves the size)
STEPS, CFG = 4, 5.0


def pipeline_timesteps(steps: int) -> list[int]:
    scheduler = make_tiny_sd21_pipe().scheduler
    scheduler.set_timesteps(steps)
    return [int(t) for t in scheduler.timesteps]


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    """Two guided targets made by our sampler on the SD 2.1-configured tiny pipeline."""
    backbone = StableDiffusionBackbone.from_pipeline(make_tiny_sd21_pipe(), resolution=SIZE)
    folder = tmp_path_factory.mktemp("targets")
    spec = TargetSpec(PROMPTS, [0, 1], Teacher(Guidance(cfg=CFG), steps=STEPS), shard_size=2)
    generate_targets(backbone, spec, folder, batch_size=2, progress=False)
    return folder


def test_sd21_scheduler_is_leading_with_offset():
    assert pipeline_timesteps(STEPS) == [751, 501, 251, 1]  # not the trailing 999, 749, 499, 249


def test_targets_are_the_pipelines_own_guided_samples(targets):
    x_T = noise_for_seeds([0, 1], (4, SIZE // 2, SIZE // 2))
    expected = make_tiny_sd21_pipe()(PROMPTS, latents=x_T.clone(), num_inference_steps=STEPS, guidance_scale=CFG,
                           height=SIZE, width=SIZE, output_type="latent").images
    data = load_targets(targets)
    assert torch.equal(data.x_T[:], x_T)
    torch.testing.assert_close(data.x_0[:], expected, rtol=0, atol=1e-4)  # float32 round-off only
    sampler = json.loads((targets / "manifest.json").read_text())["sampler"]
    assert sampler == {"scheduler": "ddim", "class": "DDIMScheduler", "timestep_spacing": "leading",
                       "steps_offset": 1, "prediction_type": "v_prediction", "timesteps": [751, 501, 251, 1]}


def test_training_samples_on_the_pipelines_timesteps(targets, tmp_path):
    """Every MSD step evaluates the UNet at the pipeline's own timesteps for N steps, after the
    refiner's one evaluation at T; the refiner's card records both samplers."""
    backbone = StableDiffusionBackbone.from_pipeline(make_tiny_sd21_pipe(), resolution=SIZE)
    seen: list[int] = []
    backbone.denoiser.register_forward_pre_hook(lambda module, args: seen.append(int(args[1].reshape(-1)[0])))
    cfg = TrainConfig(steps=1, batch_size=2, msd_steps=2, rank=2, keep_fraction=1.0, checkpoint_every=10)
    folder = train_refiner(backbone, targets, tmp_path / "run", cfg, progress=False)
    assert seen == [999] + pipeline_timesteps(2) == [999, 501, 1]
    card = json.loads((folder / "noiserefine.json").read_text())
    assert card["sampler"]["timesteps"] == [501, 1] and card["sampler"]["timestep_spacing"] == "leading"
    assert card["teacher_sampler"]["timesteps"] == [751, 501, 251, 1]
    assert "timesteps [501, 1]" in (folder / "README.md").read_text()


def test_a_folder_made_before_the_sampler_was_recorded_reads_as_trailing(targets, tmp_path):
    """Old manifests have no sampler record: they were made on trailing spacing, so they mix with
    trailing folders (shapes16) and are refused beside a leading one."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(targets, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["sampler"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert load_targets(old).manifest["sampler"] == {"timestep_spacing": "trailing"}
    with pytest.raises(NoiseRefineError, match="another base model or teacher"):
        load_targets([targets, old])
    trailing = StableDiffusionBackbone.from_pipeline(StableDiffusionPipeline(**tiny_sd_components()), resolution=SIZE)
    assert trailing.scheduler_config["timestep_spacing"] == SCHEDULER_CONFIG["timestep_spacing"] == "trailing"
    spec = TargetSpec(PROMPTS, [0, 1], Teacher(Guidance(cfg=CFG), steps=STEPS), shard_size=2)
    generate_targets(trailing, spec, old, batch_size=2, progress=False)  # same weights, trailing: it resumes
    with pytest.raises(NoiseRefineError, match="another spec or base model"):  # SD 2.1 (leading) cannot resume it
        generate_targets(StableDiffusionBackbone.from_pipeline(make_tiny_sd21_pipe(), resolution=SIZE), spec, old,
                         batch_size=2, progress=False)
