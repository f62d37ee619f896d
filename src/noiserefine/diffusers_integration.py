"""NoiseRefine inside diffusers pipelines: refined noise goes in through `latents=`.

Stable Diffusion 1.x/2.x and SDXL, after loading the pipeline:

    pipe = StableDiffusionPipeline.from_pretrained("stabilityai/stable-diffusion-2-1")   # or ...XLPipeline
    refined = NoiseRefinePipeline.from_pipe(pipe, "runs/sd21/refiner")    # a refiner folder or Hub id
    images = refined(prompts, generator=torch.Generator("cuda").manual_seed(0)).images

or, step by step (the wrapper's images equal these):

    refiner = attach_refiner(pipe, "runs/sd21/refiner")
    latents = refined_latents(refiner, prompts, seeds=range(len(prompts)))
    images = pipe(prompts, latents=latents, guidance_scale=1).images

`refined_latents` returns unit-variance noise, as the pipelines expect (they multiply `latents`
by `scheduler.init_noise_sigma` themselves and never check its shape: pass `height`/`width` when
the refiner was attached at a non-default `resolution`). `guidance_scale=1` turns CFG off:
the refiner has distilled the guidance into the noise (paper section 3), so each step costs one
UNet evaluation instead of two or three. Attaching shares the pipeline's modules: the refiner's
LoRA is active only during its own single evaluation at t = T, and our PAG processors compute
plain attention without a mask, so the pipeline's own sampling is unchanged. The user's LoRAs
(`pipe.load_lora_weights`, before or after attaching) keep working in the sampling steps; they
are off during the refiner's evaluation unless `keep_user_loras=True`.

DiT / SiT: `DiTPipeline` draws its own noise (no `latents=`), so sampling goes through our
sampler instead:

    refiner = attach_refiner(DiTPipeline.from_pretrained(folder), "runs/sit/refiner")
    images = generate_images(refiner.backbone, ["207", "golden retriever"], seeds=[0, 1], refiner=refiner)
"""

from __future__ import annotations

import inspect
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


def attach_refiner(pipe: Any, path: str | Path, *, force: bool = False, keep_user_loras: bool = False,
                   **kw: Any) -> NoiseRefiner:
    """Load a refiner (a folder, a Hugging Face Hub id or an old single `.safetensors` file) onto a
    pipeline's denoiser. `force` transfers a refiner trained on another base model (e.g. a
    fine-tune; paper section 4.3). `keep_user_loras` leaves the user's LoRAs on during the
    refiner's evaluation at t = T (default: off there, on in every sampling step; the refiner was
    trained on the base model). `kw` as in `backbone_from_pipeline`."""
    refiner = NoiseRefiner.load(backbone_from_pipeline(pipe, **kw), path, force=force)
    refiner.keep_user_loras = keep_user_loras
    return refiner


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


class NoiseRefinePipeline:
    """A diffusers pipeline (SD 1.x/2.x, SDXL: any with `latents=` and `prepare_latents`) whose
    initial noise is refined: x_T is drawn as the pipeline draws it (or from `seeds=`), refined
    with one denoiser evaluation at t = T, and sampled by the pipeline, unguided by default.
    `NoiseRefinePipeline.from_pipe(pipe, refiner)(prompt, generator=g, ...)` gives the images of
    `pipe(prompt, latents=refined_latents(refiner, prompts, x_T=<the pipeline's noise>), guidance_scale=1, ...)`."""

    def __init__(self, pipe: Any, refiner: NoiseRefiner) -> None:
        if "latents" not in inspect.signature(pipe.__call__).parameters or not hasattr(pipe, "prepare_latents"):
            raise NoiseRefineError(f"{type(pipe).__name__} takes no latents=: sample through generate_images")
        if getattr(pipe, "unet", None) is not refiner.backbone.denoiser:
            raise NoiseRefineError("the refiner is attached to another model than this pipeline's UNet; "
                                   "attach it with attach_refiner(pipe, ...) or pass its path to from_pipe")
        self.pipe = pipe
        self.refiner = refiner

    @classmethod
    def from_pipe(cls, pipe: Any, refiner: NoiseRefiner | str | Path, **attach: Any) -> "NoiseRefinePipeline":
        """Wrap `pipe` with `refiner`: an attached NoiseRefiner, or a refiner folder / Hub id / old
        file, attached here (`attach` as in `attach_refiner`: force, keep_user_loras, resolution, ...)."""
        if not isinstance(refiner, NoiseRefiner):
            refiner = attach_refiner(pipe, refiner, **attach)
        elif attach:
            raise NoiseRefineError(f"{sorted(attach)} apply when from_pipe attaches the refiner (pass its path)")
        return cls(pipe, refiner)

    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str], *, seeds: Sequence[int] | None = None,
                 latents: torch.Tensor | None = None, generator: Any = None, height: int | None = None,
                 width: int | None = None, num_images_per_prompt: int = 1, guidance_scale: float = 1.0,
                 refine_strength: float = 1.0, teacher_scale: float | None = None, **pipe_kwargs: Any) -> Any:
        """The pipeline's output for refined initial noise.

        Args:
            prompt: as the pipeline's (text: the refiner encodes it too).
            seeds: one per image (prompt-major, as the pipeline orders `num_images_per_prompt`): the
                noise of `refined_latents(seeds=...)`. Else `latents` (Gaussian, unit variance), else
                the pipeline's own draw with `generator` (`prepare_latents`).
            height, width: default and only choice: the resolution the refiner was attached at.
            guidance_scale: the pipeline's CFG scale; 1 samples unguided (the refiner distilled the guidance).
            refine_strength: s in x_T + s * delta (paper Fig. 13).
            teacher_scale: for a guidance-scale-conditioned refiner, the teacher scale to emulate (A.4).
            pipe_kwargs: the pipeline's other arguments (num_inference_steps, output_type, ...).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        per_image = [p for p in prompts for _ in range(num_images_per_prompt)]
        height, width = self._size(height, width)
        if self.refiner.scale_proj is not None and teacher_scale is None:
            raise NoiseRefineError("this refiner is guidance-scale conditioned: pass teacher_scale= (the teacher "
                                   "CFG scale whose guidance it should put into the noise)")
        cond = self.refiner.encode_prompts(per_image)
        x_T = self._initial_noise(len(per_image), height, width, cond["encoder_hidden_states"].dtype,
                                  seeds, latents, generator)
        backbone = self.refiner.backbone
        refined = self.refiner(x_T.to(backbone.device, backbone.dtype), cond, strength=refine_strength,
                               guidance_scale=teacher_scale)
        return self.pipe(prompt, latents=refined, generator=generator, height=height, width=width,
                         num_images_per_prompt=num_images_per_prompt, guidance_scale=guidance_scale, **pipe_kwargs)

    def _size(self, height: int | None, width: int | None) -> tuple[int, int]:
        attached = self.refiner.backbone.resolution
        size = (height or attached[0], width or attached[1])
        if size != tuple(attached):
            raise NoiseRefineError(f"the refiner was attached at {attached[0]}x{attached[1]} px, asked for "
                                   f"{size[0]}x{size[1]}: attach it with resolution=({size[0]}, {size[1]})")
        return size

    def _initial_noise(self, n: int, height: int, width: int, dtype: torch.dtype, seeds: Sequence[int] | None,
                       latents: torch.Tensor | None, generator: Any) -> torch.Tensor:
        """Unit-variance x_T: from `seeds`, the given `latents`, or drawn as the pipeline draws it
        (`prepare_latents` multiplies by the scheduler's init_noise_sigma; divided back out here)."""
        if seeds is not None and latents is not None:
            raise NoiseRefineError("pass seeds= or latents=, not both")
        if seeds is not None:
            if len(seeds) != n:
                raise NoiseRefineError(f"{n} images but {len(seeds)} seeds")
            return noise_for_seeds(list(seeds), self.refiner.backbone.latent_shape)
        if latents is not None:
            if latents.shape[0] != n:
                raise NoiseRefineError(f"{n} images but a batch of {latents.shape[0]} latents")
            return latents
        channels = self.pipe.unet.config.in_channels
        drawn = self.pipe.prepare_latents(n, channels, height, width, dtype, self.pipe._execution_device, generator)
        return drawn / self.pipe.scheduler.init_noise_sigma


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
