"""Stable Diffusion XL backbone: a diffusers UNet2DConditionModel with added conditioning
("text_time": pooled text embeddings + size/crop time ids) in an AutoencoderKL latent space,
conditioned on two CLIP text encoders.

The adapter translates, never re-implements: prompts are encoded as `StableDiffusionXLPipeline.
encode_prompt` does (penultimate hidden states of both encoders, concatenated; the pooled
projection of the second), the added time ids are the pipeline's defaults for a square-crop
image of `resolution` (original = target size, crop (0, 0)), and latents are decoded as the
pipeline does (fp16 VAE upcast, optional latents mean/std). Oracle tests hold it to the pipeline.

The empty prompt "" is the unconditional prompt. With the pipeline config
`force_zeros_for_empty_prompt` (SDXL base: True) the pipeline's unconditional embeddings are
zeros, not the encoding of "", so ours are too.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from torch import nn

from noiserefine.backbones.base import Cond, DenoiserBackboneMixin, batch_timesteps, config_hash, pixel_resolution
from noiserefine.backbones.pag import install_pag_processors
from noiserefine.errors import NoiseRefineError

DEFAULT_PAG_LAYERS = ("mid",)  # diffusers' StableDiffusionXLPAGPipeline default


class StableDiffusionXLBackbone(DenoiserBackboneMixin):
    """Backbone protocol for SDXL (base) UNets; `text_encoder`/`tokenizer` may be None (as the
    pipeline allows), `text_encoder_2` must be a CLIPTextModelWithProjection.

    Conditioning keys: `encoder_hidden_states` (B, 77, D1 + D2), `text_embeds` (B, P) pooled,
    `time_ids` (B, 6). PAG processors are installed on `pag_layers`; with no mask they are plain
    scaled-dot-product attention, so a pipeline sharing the UNet is unaffected.
    """

    def __init__(self, unet: UNet2DConditionModel, text_encoder: nn.Module | None, tokenizer: Any,
                 text_encoder_2: nn.Module, tokenizer_2: Any, vae: AutoencoderKL, scheduler_config: dict[str, Any],
                 force_zeros_for_empty_prompt: bool = True, pag_layers: Sequence[str] = DEFAULT_PAG_LAYERS,
                 resolution: int | tuple[int, int] | None = None) -> None:
        if unet.config.addition_embed_type != "text_time":
            raise NoiseRefineError(
                f"SDXL needs a UNet with addition_embed_type 'text_time', got {unet.config.addition_embed_type!r}; "
                "use StableDiffusionBackbone for SD 1.x/2.x")
        if unet.config.time_cond_proj_dim is not None:
            raise NoiseRefineError("this UNet is guidance-embedded (time_cond_proj_dim is set): it has no "
                                   "unguided/guided gap for a noise refiner to close")
        if text_encoder_2 is None or tokenizer_2 is None:
            raise NoiseRefineError("SDXL needs text_encoder_2 and tokenizer_2 (the pooled-embedding encoder)")
        self.denoiser = unet
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.vae = vae
        self.scheduler_config = dict(scheduler_config)
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self.pag_layers = tuple(pag_layers)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)  # as the pipeline
        self.resolution = pixel_resolution(resolution, unet.config.sample_size, self.vae_scale_factor)
        self._check_time_ids()
        self._pag = install_pag_processors(unet, self.pag_layers)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_pipeline(cls, pipe: Any, pag_layers: Sequence[str] = DEFAULT_PAG_LAYERS,
                      resolution: int | tuple[int, int] | None = None) -> "StableDiffusionXLBackbone":
        """Share the components of a `StableDiffusionXLPipeline` (its UNet gets our PAG processors)."""
        missing = [n for n in ("unet", "vae", "text_encoder_2", "tokenizer_2", "scheduler")
                   if getattr(pipe, n, None) is None]
        if missing:
            raise NoiseRefineError(f"pipeline lacks {', '.join(missing)}; expected a StableDiffusionXLPipeline")
        force_zeros = getattr(pipe.config, "force_zeros_for_empty_prompt", True)
        return cls(pipe.unet, getattr(pipe, "text_encoder", None), getattr(pipe, "tokenizer", None),
                   pipe.text_encoder_2, pipe.tokenizer_2, pipe.vae, dict(pipe.scheduler.config),
                   force_zeros_for_empty_prompt=force_zeros, pag_layers=pag_layers, resolution=resolution)

    @classmethod
    def from_pretrained(cls, path_or_id: str, torch_dtype: torch.dtype | None = None,
                        pag_layers: Sequence[str] = DEFAULT_PAG_LAYERS,
                        resolution: int | tuple[int, int] | None = None, **kw: Any) -> "StableDiffusionXLBackbone":
        """Load a saved SDXL pipeline (folder or hub id); `kw` go to `StableDiffusionXLPipeline.from_pretrained`."""
        pipe = StableDiffusionXLPipeline.from_pretrained(path_or_id, torch_dtype=torch_dtype, **kw)
        return cls.from_pipeline(pipe, pag_layers=pag_layers, resolution=resolution).eval()

    def _check_time_ids(self) -> None:
        # The pipeline's `_get_add_time_ids` check: 6 time ids + the pooled projection.
        expected = self.denoiser.add_embedding.linear_1.in_features
        passed = self.denoiser.config.addition_time_embed_dim * 6 + self._projection_dim
        if expected != passed:
            raise NoiseRefineError(f"the UNet expects added embeddings of size {expected}, the text encoders give "
                                   f"{passed}; these components do not belong together")

    @property
    def _projection_dim(self) -> int:
        return int(self.text_encoder_2.config.projection_dim)

    def eval(self) -> "StableDiffusionXLBackbone":
        for module in (self.denoiser, self.text_encoder, self.text_encoder_2, self.vae):
            if module is not None:
                module.eval()
        return self

    # -- protocol -----------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        return f"sdxl-unet-{config_hash(self.denoiser.config)}"

    @property
    def latent_shape(self) -> tuple[int, ...]:
        h, w = self.resolution
        return (self.denoiser.config.in_channels, h // self.vae_scale_factor, w // self.vae_scale_factor)

    @property
    def add_time_ids(self) -> torch.Tensor:
        """(1, 6): original size, crop top-left, target size, as the pipeline's defaults."""
        h, w = self.resolution
        return torch.tensor([[h, w, 0, 0, h, w]], dtype=self.text_encoder_2.dtype, device=self.device)

    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        """As `StableDiffusionXLPipeline.encode_prompt` (no clip_skip, prompt_2 = prompt); "" is
        the unconditional prompt: zeros under `force_zeros_for_empty_prompt`, else the encoding of ""."""
        if isinstance(prompts, str):
            raise NoiseRefineError("encode_prompts takes a list of prompts, got a single string")
        prompts = list(prompts)
        pairs = [(t, e) for t, e in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2))
                 if t is not None and e is not None]
        hidden, pooled = [], None
        for tokenizer, encoder in pairs:
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
            longest = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
            if longest.shape[-1] > ids.shape[-1]:
                warnings.warn(f"prompts longer than {tokenizer.model_max_length} tokens were truncated, "
                              "as the SDXL pipeline does", stacklevel=2)
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:  # the pipeline's rule: the projected (pooled) output
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        if pooled is None:
            raise NoiseRefineError("text_encoder_2 gave no pooled output; expected a CLIPTextModelWithProjection")
        embeds = torch.cat(hidden, dim=-1).to(dtype=self.text_encoder_2.dtype, device=self.device)
        pooled = pooled.to(device=self.device)
        if self.force_zeros_for_empty_prompt:
            empty = torch.tensor([p == "" for p in prompts], device=self.device)
            embeds = torch.where(empty[:, None, None], torch.zeros_like(embeds), embeds)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        return {"encoder_hidden_states": embeds, "text_embeds": pooled,
                "time_ids": self.add_time_ids.to(embeds.dtype).expand(len(prompts), -1)}

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        return self.denoiser(x_t, batch_timesteps(t, x_t), encoder_hidden_states=cond["encoder_hidden_states"],
                             added_cond_kwargs=added).sample

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """As the pipeline for `output_type != "latent"`: an fp16 VAE with `force_upcast` decodes in fp32."""
        upcast = self.vae.dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False)
        dtype = torch.float32 if upcast else self.vae.dtype
        latents = latents.to(dtype=dtype, device=self.vae.device)
        mean, std = getattr(self.vae.config, "latents_mean", None), getattr(self.vae.config, "latents_std", None)
        if mean is not None and std is not None:
            c = latents.shape[1]
            mean = torch.tensor(mean, dtype=dtype, device=latents.device).view(1, c, 1, 1)
            std = torch.tensor(std, dtype=dtype, device=latents.device).view(1, c, 1, 1)
            latents = latents * std / self.vae.config.scaling_factor + mean
        else:
            latents = latents / self.vae.config.scaling_factor
        if not upcast:
            return self.vae.decode(latents).sample
        self.vae.to(torch.float32)
        try:
            return self.vae.decode(latents).sample
        finally:
            self.vae.to(torch.float16)
