"""The backbone protocol: everything a sampler, a guidance rule or a noise method needs of a model.

A backbone owns a denoiser network (the module LoRA refiners attach to), knows how to turn prompts
into conditioning, predicts at (x_t, t), can switch perturbed self-attention on for chosen batch
entries (PAG), and decodes latents to images in [-1, 1]. A backbone may carry a `guide`: a weaker
backbone of the same family that autoguidance extrapolates away from (`attach_guide`).
"""

from __future__ import annotations

import hashlib
import json
from contextlib import AbstractContextManager
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from noiserefine.backbones.pag import PerturbState, perturbed
from noiserefine.errors import NoiseRefineError
from noiserefine.io import state_hash

Cond = dict[str, torch.Tensor]
"""Conditioning: named tensors, batch-first (e.g. `encoder_hidden_states`, `class_labels`)."""

ROUNDED_HASHES: dict[str, torch.dtype] = {"weights_sha256_fp16": torch.float16, "weights_sha256_bf16": torch.bfloat16}
"""Fingerprint keys hashing the weights rounded to a dtype (`model_fingerprint`)."""


class DenoiserBackboneMixin:
    """The protocol members every adapter derives the same way from `self.denoiser`, its
    `architecture` and the PAG state `self._pag` that `pag.install_pag_processors` returned."""

    denoiser: nn.Module
    architecture: str  # the model family and its configuration: the fingerprint's first half
    _pag: PerturbState
    guide: "Backbone | None" = None  # the weaker model autoguidance extrapolates away from
    _fingerprint: tuple[torch.dtype, dict[str, str]] | None = None  # (dtype it was computed in, fingerprint)

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    def perturbed_attention(self, mask: torch.Tensor | None) -> AbstractContextManager[None]:
        return perturbed(self._pag, mask)

    def fingerprint(self) -> dict[str, str]:
        """`model_fingerprint` of the denoiser, computed once per dtype (hashing a large model takes
        seconds; its weights are frozen, converting it changes the exact-bytes hash)."""
        if self._fingerprint is None or self._fingerprint[0] != self.dtype:
            self._fingerprint = (self.dtype, model_fingerprint(self.architecture, self.denoiser))
        return self._fingerprint[1]


def batch_timesteps(t: torch.Tensor | float, x_t: torch.Tensor) -> torch.Tensor:
    """A timestep (scalar, or one per sample) as one per sample of `x_t`, on its device: what a
    denoiser's `timestep` argument takes."""
    return torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])


def config_hash(config: Mapping[str, Any]) -> str:
    """8 hex digits over a model's public config entries (the architecture, not the file it came from)."""
    public = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(public, sort_keys=True, default=str).encode()).hexdigest()[:8]


def model_fingerprint(architecture: str, denoiser: nn.Module) -> dict[str, str]:
    """What refiners, NPNets and target sets record of the model they were made with.

    `weights_sha256` hashes the weights' bytes as they are (so it changes with the dtype); records
    written before the other two keys existed hold only it. `weights_sha256_fp16` / `_bf16` hash the
    weights rounded to fp16 / bf16, so the same weights loaded in another dtype keep one of them:
    fp32 weights loaded in fp16 round to the same fp16 values, loaded in bf16 to the same bf16
    values, and weights stored in fp16 give the same bf16 hash whatever dtype they are loaded in.
    Not kept: fp16 and bf16 loadings of fp32 weights (rounding through fp16 first moves about 6% of
    the bf16 values by one step, so no rounding can make them agree); they need `force`.
    """
    return {"architecture": architecture, "weights_sha256": state_hash(denoiser),
            **{key: state_hash(denoiser, dtype) for key, dtype in ROUNDED_HASHES.items()}}


def same_model(recorded: Mapping[str, str], fingerprint: Mapping[str, str]) -> bool:
    """Whether two `model_fingerprint`s name the same model: the same architecture and the same
    weights in a precision both hash (fp16 or bf16). A record without those hashes (written before
    they existed) is compared by its exact-bytes `weights_sha256`. The one fingerprint comparison."""
    if recorded.get("architecture") != fingerprint.get("architecture"):
        return False
    if all(key in recorded and key in fingerprint for key in ROUNDED_HASHES):
        return any(recorded[key] == fingerprint[key] for key in ROUNDED_HASHES)
    exact = recorded.get("weights_sha256")
    return exact is not None and exact == fingerprint.get("weights_sha256")


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


def select_cond(cond: Cond | None, index: torch.Tensor | slice) -> Cond | None:
    """Take batch entries `index` of every tensor (no conditioning: None)."""
    return None if cond is None else {k: v[index] for k, v in cond.items()}


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
        """Architecture name and hashes of the denoiser weights (`model_fingerprint`): refiners
        record what they fit; `same_model` compares two."""
