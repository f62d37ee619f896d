"""NoiseRefine inside diffusers pipelines: refined noise goes in through `latents=`.

Stable Diffusion 1.x/2.x and SDXL, three lines after loading the pipeline:

    pipe = StableDiffusionPipeline.from_pretrained("stabilityai/stable-diffusion-2-1")   # or ...XLPipeline
    refiner = attach_refiner(pipe, "runs/sd21/refiner.safetensors")
    latents = refined_latents(refiner, prompts, seeds=range(len(prompts)))
    images = pipe(prompts, latents=latents, guidance_scale=1).images

`refined_latents` returns unit-variance noise, as the pipelines expect (they multiply `latents`
by `scheduler.init_noise_sigma` themselves and never check its shape: pass `height`/`width` when
the refiner was attached at a non-default `resolution`). `guidance_scale=1` turns CFG off:
the refiner has distilled the guidance into the noise (paper section 3), so each step costs one
UNet evaluation instead of two or three. Attaching shares the pipeline's modules: the refiner's
LoRA is switched off outside its own single evaluation at t = T, and our PAG processors compute
plain attention without a mask, so the pipeline's own sampling is unchanged.

DiT / SiT: `DiTPipeline` draws its own noise (no `latents=`), so sampling goes through our
sampler instead:

    refiner = attach_refiner(DiTPipeline.from_pretrained(folder), "runs/sit/refiner.safetensors")
    images = generate_images(refiner.backbone, ["207", "golden retriever"], seeds=[0, 1], refiner=refiner)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from noiserefine.backbones.base import Backbone
from noiserefine.backbones.loading import adapter_class
from noiserefine.errors import NoiseRefineError
from noiserefine.generation import GaussianNoise, SamplingOptions, generate_latents
from noiserefine.guidance import UNGUIDED, Guidance
from noiserefine.methods.refine import NoiseRefiner, RefinedNoise
from noiserefine.sampling import noise_for_seeds


def backbone_from_pipeline(pipe: Any, **kw: Any) -> Backbone:
    """The adapter for a loaded StableDiffusion / StableDiffusionXL / DiT pipeline, sharing its
    modules. `kw` go to the adapter's `from_pipeline` (e.g. `resolution=`, `pag_layers=`)."""
    return adapter_class(type(pipe).__name__).from_pipeline(pipe, **kw)


def attach_refiner(pipe: Any, path: str | Path, *, force: bool = False, **kw: Any) -> NoiseRefiner:
    """Load a refiner onto a pipeline's denoiser. `force` transfers a refiner trained on another
    base model (e.g. a fine-tune; paper section 4.3). `kw` as in `backbone_from_pipeline`."""
    return NoiseRefiner.load(backbone_from_pipeline(pipe, **kw), path, force=force)


@torch.no_grad()
def refined_latents(refiner: NoiseRefiner, prompts: Sequence[str], seeds: Sequence[int] | None = None, *,
                    x_T: torch.Tensor | None = None, strength: float = 1.0,
                    guidance_scale: float | None = None) -> torch.Tensor:
    """Refined unit-variance noise for `prompts`, ready for a pipeline's `latents=`.

    Args:
        seeds: one per prompt; noise from one generator per seed (a sample does not depend on its batch).
        x_T: the Gaussian noise itself, (B, *latent_shape), instead of seeds.
        strength: s in x_T + s * delta (section 5, Fig. 13); 1 is the trained refiner.
        guidance_scale: for a guidance-scale-conditioned refiner (appendix A.4).
    """
    backbone = refiner.backbone
    if (seeds is None) == (x_T is None):
        raise NoiseRefineError("pass exactly one of seeds= or x_T=")
    if x_T is None:
        if len(seeds) != len(prompts):
            raise NoiseRefineError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        x_T = noise_for_seeds(list(seeds), backbone.latent_shape)
    elif x_T.shape[0] != len(prompts):
        raise NoiseRefineError(f"{len(prompts)} prompts but a batch of {x_T.shape[0]} noises")
    x_T = x_T.to(backbone.device, backbone.dtype)
    return RefinedNoise(refiner, strength, guidance_scale)(x_T, list(prompts))


@torch.no_grad()
def generate_images(backbone: Backbone, prompts: Sequence[str], seeds: Sequence[int], *,
                    refiner: NoiseRefiner | None = None, strength: float = 1.0, guidance: Guidance = UNGUIDED,
                    steps: int = 20, scheduler: str = "ddim", batch_size: int = 64) -> torch.Tensor:
    """Images in [-1, 1] through our sampler, for pipelines without `latents=` (DiT/SiT) or any
    backbone: refined noise when `refiner` is given (sampled unguided by default), else Gaussian."""
    method = GaussianNoise() if refiner is None else RefinedNoise(refiner, strength)
    latents = generate_latents(backbone, list(prompts), list(seeds), method,
                               SamplingOptions(guidance, steps, scheduler, batch_size))
    return torch.cat([backbone.decode(latents[i: i + batch_size]) for i in range(0, len(latents), batch_size)])
