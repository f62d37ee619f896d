"""Stable Diffusion 1.x / 2.x backbone: a diffusers UNet2DConditionModel in the latent space of an
AutoencoderKL, conditioned on CLIP text-encoder hidden states.

The adapter translates, never re-implements: prompts are encoded as `StableDiffusionPipeline.
encode_prompt` does (without clip_skip), the model output is the UNet's, latents are decoded as the
pipeline does for `output_type != "latent"`. Oracle tests hold it to the pipelines on tiny models.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from torch import nn

from noiserefine.backbones.base import (Cond, DenoiserBackboneMixin, batch_timesteps, config_hash, pixel_resolution,
                                        vae_decode)
from noiserefine.backbones.pag import install_pag_processors
from noiserefine.errors import NoiseRefineError


class StableDiffusionBackbone(DenoiserBackboneMixin):
    """Backbone protocol for SD 1.x/2.x (epsilon or v-prediction, as `scheduler_config` says).

    PAG processors are installed on the UNet's `pag_layers` at construction. With no mask they
    compute plain scaled-dot-product attention, so a pipeline sharing the UNet is unaffected.
    """

    def __init__(self, unet: UNet2DConditionModel, text_encoder: nn.Module, tokenizer: Any,
                 vae: AutoencoderKL, scheduler_config: dict[str, Any],
                 pag_layers: Sequence[str] = ("mid",), resolution: int | tuple[int, int] | None = None) -> None:
        if unet.config.addition_embed_type is not None:
            raise NoiseRefineError(
                f"this UNet needs added conditioning ({unet.config.addition_embed_type!r}, e.g. SDXL); "
                "StableDiffusionBackbone handles SD 1.x/2.x only")
        self.denoiser = unet
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.vae = vae
        self.scheduler_config = dict(scheduler_config)
        self.pag_layers = tuple(pag_layers)
        # As StableDiffusionPipeline computes it.
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.resolution = pixel_resolution(resolution, unet.config.sample_size, self.vae_scale_factor)
        self._pag = install_pag_processors(unet, self.pag_layers)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_pipeline(cls, pipe: Any, pag_layers: Sequence[str] = ("mid",),
                      resolution: int | tuple[int, int] | None = None) -> "StableDiffusionBackbone":
        """Share the components of a `StableDiffusionPipeline` (or anything with unet, vae,
        text_encoder, tokenizer and scheduler attributes). The UNet gets our PAG processors."""
        missing = [n for n in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if getattr(pipe, n, None) is None]
        if missing:
            raise NoiseRefineError(f"pipeline lacks {', '.join(missing)}; expected a StableDiffusionPipeline")
        return cls(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.vae, dict(pipe.scheduler.config),
                   pag_layers=pag_layers, resolution=resolution)

    @classmethod
    def from_pretrained(cls, path_or_id: str, torch_dtype: torch.dtype | None = None,
                        pag_layers: Sequence[str] = ("mid",), resolution: int | tuple[int, int] | None = None,
                        **kw: Any) -> "StableDiffusionBackbone":
        """Load a saved SD pipeline (folder or hub id); `kw` go to `StableDiffusionPipeline.from_pretrained`.
        The safety checker is not loaded (we never decode to user images through it)."""
        kw.setdefault("safety_checker", None)
        kw.setdefault("requires_safety_checker", False)
        pipe = StableDiffusionPipeline.from_pretrained(path_or_id, torch_dtype=torch_dtype, **kw)
        return cls.from_pipeline(pipe, pag_layers=pag_layers, resolution=resolution).eval()

    def eval(self) -> "StableDiffusionBackbone":
        for module in (self.denoiser, self.text_encoder, self.vae):
            module.eval()
        return self

    # -- protocol -----------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        return f"sd-unet-{config_hash(self.denoiser.config)}"

    @property
    def latent_shape(self) -> tuple[int, ...]:
        h, w = self.resolution
        return (self.denoiser.config.in_channels, h // self.vae_scale_factor, w // self.vae_scale_factor)

    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        """CLIP hidden states, as `StableDiffusionPipeline.encode_prompt` (no clip_skip); "" is the
        unconditional prompt, exactly the pipeline's default negative prompt."""
        if isinstance(prompts, str):
            raise NoiseRefineError("encode_prompts takes a list of prompts, got a single string")
        max_length = self.tokenizer.model_max_length
        inputs = self.tokenizer(list(prompts), padding="max_length", max_length=max_length,
                                truncation=True, return_tensors="pt")
        longest = self.tokenizer(list(prompts), padding="longest", return_tensors="pt").input_ids
        if longest.shape[-1] > inputs.input_ids.shape[-1]:
            warnings.warn(f"prompts longer than {max_length} tokens were truncated, as the SD pipeline does",
                          stacklevel=2)
        device = self.text_encoder.device
        attention_mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            attention_mask = inputs.attention_mask.to(device)
        hidden = self.text_encoder(inputs.input_ids.to(device), attention_mask=attention_mask)[0]
        return {"encoder_hidden_states": hidden.to(dtype=self.text_encoder.dtype, device=device)}

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self.denoiser(x_t, batch_timesteps(t, x_t), encoder_hidden_states=cond["encoder_hidden_states"]).sample

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return vae_decode(self.vae, latents)
