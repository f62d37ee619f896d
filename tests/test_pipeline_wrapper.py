"""`NoiseRefinePipeline` (issue 14, item 2): the pipeline's own call with refined initial noise.
Its images equal `pipe(latents=refined_latents(...), guidance_scale=1)` for noise drawn as the
pipeline draws it (its `prepare_latents` with the user's generator) or from seeds."""

from __future__ import annotations

import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor
from sd_components import make_tiny_dit_pipe, make_tiny_sd_pipe, make_tiny_sdxl_pipe

from noiserefine.diffusers_integration import NoiseRefinePipeline, attach_refiner, backbone_from_pipeline, refined_latents
from noiserefine.errors import NoiseRefineError
from noiserefine.methods.refine import NoiseRefiner, RefinerConfig

PROMPTS = ["a red circle on the left", "a blue square on the top"]
CALL = {"num_inference_steps": 2, "output_type": "latent"}
SIZE = {"height": 32, "width": 32}


def random_refiner_folder(pipe, folder, **config):
    """A refiner whose delta head is random (a trained one is not the identity either), saved."""
    backbone = backbone_from_pipeline(pipe, resolution=32)
    refiner = NoiseRefiner(backbone, RefinerConfig(rank=2, **config))
    with torch.no_grad():
        torch.manual_seed(0)
        refiner.delta_head.weight.normal_(std=0.05)
    return refiner.save_pretrained(folder)


@pytest.mark.parametrize("make_pipe", [make_tiny_sd_pipe, make_tiny_sdxl_pipe], ids=["sd", "sdxl"])
def test_wrapper_images_equal_the_latents_path(tmp_path, make_pipe):
    folder = random_refiner_folder(make_pipe(), tmp_path / "refiner")
    pipe = make_pipe()
    plain = pipe(PROMPTS, generator=torch.Generator().manual_seed(0), guidance_scale=1, **SIZE, **CALL).images
    wrapped = NoiseRefinePipeline.from_pipe(pipe, folder, resolution=32)
    refiner = wrapped.refiner

    images = wrapped(PROMPTS, generator=torch.Generator().manual_seed(0), **CALL).images  # size: the refiner's
    gaussian = randn_tensor((2, *refiner.backbone.latent_shape), generator=torch.Generator().manual_seed(0))
    expected = pipe(PROMPTS, latents=refined_latents(refiner, PROMPTS, x_T=gaussian), guidance_scale=1,
                    **SIZE, **CALL).images
    assert torch.equal(images, expected)
    assert (images - plain).abs().max() > 1e-3  # the refined noise changed the sample

    # Seeds, several images per prompt (prompt-major, as the pipeline orders them), decoded output.
    seeds = [5, 6, 7, 8]
    decoded = {"num_inference_steps": 2, "output_type": "pt"}
    images = wrapped(PROMPTS, seeds=seeds, num_images_per_prompt=2, **decoded).images
    per_image = [p for p in PROMPTS for _ in range(2)]
    expected = pipe(PROMPTS, latents=refined_latents(refiner, per_image, seeds=seeds), num_images_per_prompt=2,
                    guidance_scale=1, **SIZE, **decoded).images
    assert images.shape == (4, 3, 32, 32) and torch.equal(images, expected)


def test_wrapper_arguments_and_refusals(tmp_path):
    folder = random_refiner_folder(make_tiny_sd_pipe(), tmp_path / "refiner")
    pipe = make_tiny_sd_pipe()
    refiner = attach_refiner(pipe, folder, resolution=32)
    wrapped = NoiseRefinePipeline.from_pipe(pipe, refiner)
    for kwargs, message in [({"height": 64}, "attached at 32x32 px, asked for 64x32"),
                            ({"seeds": [1]}, "2 images but 1 seeds"),
                            ({"seeds": [1, 2], "latents": torch.zeros(2, 4, 16, 16)}, "not both"),
                            ({"latents": torch.zeros(3, 4, 16, 16)}, "2 images but a batch of 3")]:
        with pytest.raises(NoiseRefineError, match=message):
            wrapped(PROMPTS, **kwargs, **CALL)
    with pytest.raises(NoiseRefineError, match="apply when from_pipe attaches"):
        NoiseRefinePipeline.from_pipe(pipe, refiner, force=True)
    with pytest.raises(NoiseRefineError, match="attached to another model"):
        NoiseRefinePipeline.from_pipe(make_tiny_sd_pipe(), refiner)
    with pytest.raises(NoiseRefineError, match="takes no latents="):
        NoiseRefinePipeline(make_tiny_dit_pipe(), refiner)

    conditioned = random_refiner_folder(make_tiny_sd_pipe(), tmp_path / "conditioned", scale_conditioning=True)
    wrapped = NoiseRefinePipeline.from_pipe(make_tiny_sd_pipe(), conditioned, resolution=32)
    with pytest.raises(NoiseRefineError, match="pass teacher_scale="):
        wrapped(PROMPTS, seeds=[1, 2], **CALL)
    assert wrapped(PROMPTS, seeds=[1, 2], teacher_scale=3.0, **CALL).images.shape == (2, 4, 16, 16)
