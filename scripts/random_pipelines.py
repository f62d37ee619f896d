"""Pipeline folders with the exact UNet configuration of SD 2.1 (768 px, v-prediction) or SDXL base
(1024 px) and random bf16 weights, for planning and timing where the real weights cannot be
downloaded (`targets/train --preset sd21|sdxl --model FOLDER --dry-run`: docs/real-models.md).

The UNet (the model evaluated every step), the VAE and the scheduler configuration are the real
models'; the text encoders are one-layer CLIP models of the real widths (they run once per
prompt, not per step). Nothing is downloaded. Usage:

    .venv/bin/python scripts/random_pipelines.py --model sd21 --out /tmp/sd21-random-768
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from sd_components import MAX_LENGTH, tiny_tokenizer  # noqa: E402

# stabilityai/stable-diffusion-2-1 unet/config.json and scheduler/scheduler_config.json
SD21_UNET = dict(
    sample_size=96, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True, upcast_attention=True,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD21_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                      num_train_timesteps=1000, prediction_type="v_prediction", set_alpha_to_one=False, steps_offset=1)
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json and scheduler/scheduler_config.json
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    use_linear_projection=True)
SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      prediction_type="epsilon", steps_offset=1, timestep_spacing="leading", interpolation_type="linear",
                      use_karras_sigmas=False)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
              block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4)


def text_encoder(width: int, projection: int | None = None) -> torch.nn.Module:
    config = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=width,
                            intermediate_size=4 * width, num_attention_heads=width // 64, num_hidden_layers=1,
                            max_position_embeddings=MAX_LENGTH, vocab_size=len(tiny_tokenizer()),
                            **({"projection_dim": projection} if projection else {}))
    return (CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)).eval()


def build(model: str):
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # initialise in bf16: SDXL's UNet in fp32 needs 10 GB
    try:
        if model == "sd21":
            return StableDiffusionPipeline(
                unet=UNet2DConditionModel(**SD21_UNET).eval(), vae=AutoencoderKL(**SD_VAE, sample_size=768).eval(),
                text_encoder=text_encoder(1024), tokenizer=tiny_tokenizer(), scheduler=DDIMScheduler(**SD21_SCHEDULER),
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        return StableDiffusionXLPipeline(
            unet=UNet2DConditionModel(**SDXL_UNET).eval(), vae=AutoencoderKL(**SD_VAE, sample_size=1024).eval(),
            text_encoder=text_encoder(768), tokenizer=tiny_tokenizer(), text_encoder_2=text_encoder(1280, 1280),
            tokenizer_2=tiny_tokenizer(), scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER))
    finally:
        torch.set_default_dtype(torch.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["sd21", "sdxl"], required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    pipe = build(args.model)
    print(f"UNet {sum(p.numel() for p in pipe.unet.parameters()):,} parameters", flush=True)
    pipe.save_pretrained(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
