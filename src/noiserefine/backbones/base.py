"""The backbone protocol: everything a sampler, a guidance rule or a noise method needs of a model.

A backbone owns a denoiser network (the module LoRA refiners attach to), knows how to turn prompts
into conditioning, predicts at (x_t, t), can switch perturbed self-attention on for chosen batch
entries (PAG), and decodes latents to images in [-1, 1]. A backbone may carry a `guide`: a weaker
backbone of the same family that autoguidance extrapolates away from (`attach_guide`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from noiserefine.errors import NoiseRefineError

Cond = dict[str, torch.Tensor]
"""Conditioning: named tensors, batch-first (e.g. `encoder_hidden_states`, `class_labels`)."""


class DenoiserBackboneMixin:
    """The protocol members every adapter derives the same way from `self.denoiser` and the PAG
    state `self._pag` that `pag.install_pag_processors` returned."""

    denoiser: nn.Module
    guide: "Backbone | None" = None  # the weaker model autoguidance extrapolates away from

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    def perturbed_attention(self, mask: torch.Tensor | None) -> AbstractContextManager[None]:
        from noiserefine.backbones.pag import perturbed

        return perturbed(self._pag, mask)


def pixel_resolution(resolution: int | tuple[int, int] | None, sample_size: int | Sequence[int],
                     vae_scale_factor: int) -> tuple[int, int]:
    """(height, width) in pixels of a latent-diffusion UNet: `resolution` if given (checked to be
    positive multiples of the VAE scale factor), else the UNet's `sample_size` times that factor."""
    if resolution is None:
        h, w = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
        return h * vae_scale_factor, w * vae_scale_factor
    h, w = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    if h % vae_scale_factor or w % vae_scale_factor or h <= 0 or w <= 0:
        raise NoiseRefineError(
            f"resolution {h}x{w} must be positive multiples of the VAE scale factor {vae_scale_factor}")
    return h, w


def vae_decode(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [-1, 1] through an AutoencoderKL, as the SD and DiT pipelines do."""
    latents = latents.to(dtype=vae.dtype, device=vae.device)
    return vae.decode(latents / vae.config.scaling_factor).sample


def attach_guide(backbone: "Backbone", guide: "Backbone") -> "Backbone":
    """Give `backbone` a guide model for autoguidance (Karras et al. 2024): a weaker model of the
    same family -- same latent shape, output parameterisation and noise schedule,
    e.g. an earlier snapshot or a smaller model. Returns `backbone`."""
    mine, theirs = backbone.scheduler_config, guide.scheduler_config
    for key in ("prediction_type", "num_train_timesteps", "beta_schedule"):
        if mine.get(key) != theirs.get(key):
            raise NoiseRefineError(f"the guide model's {key} is {theirs.get(key)!r}, the backbone's {mine.get(key)!r}")
    if tuple(guide.latent_shape) != tuple(backbone.latent_shape):
        raise NoiseRefineError(f"the guide model's latents are {tuple(guide.latent_shape)}, "
                               f"the backbone's {tuple(backbone.latent_shape)}")
    backbone.guide = guide
    return backbone


def cat_cond(conds: Sequence[Cond]) -> Cond:
    """Concatenate conditionings along the batch, key by key."""
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def select_cond(cond: Cond, index: torch.Tensor | slice) -> Cond:
    """Take batch entries `index` of every tensor."""
    return {k: v[index] for k, v in cond.items()}


@runtime_checkable
class Backbone(Protocol):
    """What every model family implements. Adapters are thin: they translate, never re-implement."""

    denoiser: nn.Module
    scheduler_config: dict[str, Any]

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one initial noise / latent, without the batch dimension."""

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        """Conditioning for `prompts`; the empty prompt "" is the unconditional one."""

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The raw model output (epsilon, v or velocity, as `scheduler_config` says) at (x_t, t)."""

    def perturbed_attention(self, mask: torch.Tensor | None) -> AbstractContextManager[None]:
        """Within the context, batch entries where `mask` is True use identity self-attention
        in the backbone's PAG layers (Ahn et al. 2024); the others are untouched."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (B, 3, H, W)."""

    def fingerprint(self) -> dict[str, str]:
        """Architecture name and a hash of the denoiser weights: refiners record what they fit."""
