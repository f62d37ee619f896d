"""Tiny Stable Diffusion components built from config, offline (no hub ids, nothing downloaded).

Shapes follow diffusers' own `get_dummy_components` (tests/pipelines/stable_diffusion/
test_stable_diffusion.py), with `torch.manual_seed(0)` before each model so two calls build
identical weights. The tokenizer is a real byte-level BPE CLIPTokenizer on a small vocabulary:
transformers 5's `CLIPTokenizer(vocab_file=..., merges_file=...)` silently falls back to a
3-token vocabulary, so we build it from a `vocab=` dict and `merges=` instead.
"""

from __future__ import annotations

from typing import Any

import torch
from tokenizers.pre_tokenizers import ByteLevel
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77
WORDS = ("a", "red", "blue", "green", "circle", "square", "triangle", "on", "the", "left", "right", "top",
         "bottom", "photo", "of", "cat", "dog")

SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "trailing",
}


def tiny_tokenizer() -> CLIPTokenizer:
    """Byte-level BPE: every byte alone and word-final, plus left-to-right merges of WORDS."""
    chars = sorted(ByteLevel.alphabet())
    vocab = {BOS: 0, EOS: 1}
    for token in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    )


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
    )


def tiny_text_encoder(vocab_size: int) -> CLIPTextModel:
    torch.manual_seed(0)
    config = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        max_position_embeddings=MAX_LENGTH,
        vocab_size=vocab_size,
    )
    return CLIPTextModel(config).eval()


def tiny_sd_components() -> dict[str, Any]:
    """Keyword arguments for `StableDiffusionPipeline(**components)`."""
    tokenizer = tiny_tokenizer()
    return {
        "unet": tiny_unet().eval(),
        "scheduler": DDIMScheduler(**SCHEDULER_CONFIG),
        "vae": tiny_vae().eval(),
        "text_encoder": tiny_text_encoder(len(tokenizer)),
        "tokenizer": tokenizer,
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "requires_safety_checker": False,
    }


def make_tiny_sd_pipe() -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(**tiny_sd_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe
