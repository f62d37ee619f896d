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


# stabilityai/stable-diffusion-2-1's scheduler/scheduler_config.json (diffusers 0.8 era: no timestep_spacing,
# so DDIM's "leading"; steps_offset 1; v-prediction)
SD21_SCHEDULER: dict[str, Any] = {
    "_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}


def make_tiny_sd21_pipe() -> StableDiffusionPipeline:
    """The tiny SD pipeline with Stable Diffusion 2.1's scheduler configuration."""
    pipe = StableDiffusionPipeline(**{**tiny_sd_components(), "scheduler": DDIMScheduler.from_config(SD21_SCHEDULER)})
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- SDXL ---------------------------------------------------------------------------------------
def tiny_sdxl_unet() -> UNet2DConditionModel:
    """diffusers' SDXL `get_dummy_components` UNet: text_time added conditioning, 6 x 8 time ids
    + a 32-d pooled projection, cross-attention over both encoders' 32 + 32 channels."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(2, 4),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
        norm_num_groups=1,
    )


def tiny_sdxl_components(force_zeros_for_empty_prompt: bool = True) -> dict[str, Any]:
    """Keyword arguments for `StableDiffusionXLPipeline(**components)`; DDIM (trailing)."""
    from transformers import CLIPTextModelWithProjection

    tokenizer = tiny_tokenizer()
    text_encoder = tiny_text_encoder(len(tokenizer))
    torch.manual_seed(1)  # the second encoder must differ from the first
    config = CLIPTextConfig(**{**text_encoder.config.to_dict(), "projection_dim": 32})
    text_encoder_2 = CLIPTextModelWithProjection(config).eval()
    return {
        "unet": tiny_sdxl_unet().eval(),
        "scheduler": DDIMScheduler(**SCHEDULER_CONFIG),
        "vae": tiny_vae().eval(),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tiny_tokenizer(),
        "image_encoder": None,
        "feature_extractor": None,
        "force_zeros_for_empty_prompt": force_zeros_for_empty_prompt,
    }


def make_tiny_sdxl_pipe(force_zeros_for_empty_prompt: bool = True):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**tiny_sdxl_components(force_zeros_for_empty_prompt))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- DiT / SiT ----------------------------------------------------------------------------------
DIT_LABELS = {0: "tabby cat, tabby", 1: "golden retriever", 2: "goldfish"}
DIT_SCHEDULER_CONFIG: dict[str, Any] = {  # as facebook/DiT-XL-2-256's DDIM, with trailing spacing
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "timestep_spacing": "trailing",
}


def tiny_dit(num_layers: int = 2, num_classes: int = 1000):
    """diffusers' DiT `get_dummy_components` transformer: learned sigma (8 = 2 x 4 output
    channels), 1000 classes + the null class (label dropout 0.1 in CombinedTimestepLabelEmbeddings)."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(
        sample_size=8,
        num_layers=num_layers,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        in_channels=4,
        out_channels=8,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=num_classes,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
    ).eval()


def make_tiny_dit_pipe(flow: bool = False):
    """A DiTPipeline on tiny seeded components; `flow=True` gives the SiT-style folder layout
    (a FlowMatchEulerDiscreteScheduler)."""
    from diffusers import DiTPipeline, FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler() if flow else DDIMScheduler(**DIT_SCHEDULER_CONFIG)
    pipe = DiTPipeline(transformer=tiny_dit(), vae=tiny_vae().eval(), scheduler=scheduler, id2label=DIT_LABELS)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- CLIP (scorers, FD features) ------------------------------------------------------------------
def save_tiny_clip(folder, seed: int = 0):
    """A tiny CLIP (32x32 images, 16-d projection) saved as a local folder (model, tokenizer, image
    processor), as users keep ViT-L/14 or PickScore; returns the folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer = tiny_tokenizer()
    text = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def clip_logits_by_hand(folder, processor, tokenizer, images, prompts):
    """CLIPModel.forward's `logits_per_image` (exp(logit_scale) * cos, every image x prompt) on the
    processor's pixels of `images` in [-1, 1] taken to uint8, and the model's logit scale: an oracle
    for scorers built on a CLIP folder."""
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(folder).eval()
    with torch.no_grad():
        pixels = processor(images=list(((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
                                       .permute(0, 2, 3, 1).numpy()), return_tensors="pt").pixel_values
        tokens = tokenizer(list(prompts), padding=True, return_tensors="pt")
        out = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels)
    return out.logits_per_image, model.logit_scale.exp()
