"""Perturbed-attention guidance plumbing shared by every UNet/transformer backbone.

diffusers' PAG processors split the batch into halves or thirds and perturb a fixed chunk, so an
un-doubled batch is silently mis-perturbed. Ours takes an explicit per-sample mask instead; with
no mask it is plain scaled-dot-product attention, so it can stay installed permanently.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from noiserefine.errors import NoiseRefineError


class PerturbState:
    """The mask the processors read; one instance is shared by all PAG layers of a model."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None


class MaskedIdentitySelfAttnProcessor:
    """Self-attention whose masked batch entries use the identity attention map (PAG, Eq. 8).

    For those entries the attention output is `to_out(to_v(h))`, exactly as diffusers'
    `PAGIdentitySelfAttnProcessor2_0` computes its perturbed chunk.
    """

    def __init__(self, state: PerturbState) -> None:
        self.state = state
        self.plain = AttnProcessor2_0()

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, **kwargs) -> torch.Tensor:
        mask = self.state.mask
        if mask is None or not bool(mask.any()):
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        out = torch.empty_like(hidden_states)
        keep = ~mask
        if bool(keep.any()):
            out[keep] = self.plain(attn, hidden_states[keep], None, attention_mask, temb)
        out[mask] = _identity_attention(attn, hidden_states[mask], temb)
        return out


def _identity_attention(attn: Attention, hidden_states: torch.Tensor, temb) -> torch.Tensor:
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    shape = hidden_states.shape
    if hidden_states.ndim == 4:
        b, c, h, w = shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    hidden_states = attn.to_out[1](attn.to_out[0](attn.to_v(hidden_states)))
    if len(shape) == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(shape)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


def matches_layer(layer_id: str, name: str) -> bool:
    """diffusers' layer-id rule (regex search on the module name), minus its `blocks.1` matching
    `blocks.10` bug: a layer id ending in a digit must not be followed by another digit."""
    return re.search(layer_id + r"(?!\d)", name) is not None


def install_pag_processors(model: nn.Module, layers: Sequence[str]) -> PerturbState:
    """Put mask-aware processors on the self-attention modules matching any of `layers`."""
    state = PerturbState()
    found = 0
    for layer_id in layers:
        hits = [
            m for name, m in model.named_modules()
            if isinstance(m, Attention) and not m.is_cross_attention and matches_layer(layer_id, name)
        ]
        if not hits:
            raise NoiseRefineError(f"no self-attention layer matches PAG layer id {layer_id!r}")
        for module in hits:
            module.set_processor(MaskedIdentitySelfAttnProcessor(state))
        found += len(hits)
    return state


@contextmanager
def perturbed(state: PerturbState, mask: torch.Tensor | None) -> Iterator[None]:
    """Set the perturbation mask for the duration of one forward."""
    previous, state.mask = state.mask, mask
    try:
        yield
    finally:
        state.mask = previous
