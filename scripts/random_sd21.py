"""An SD 2.1-base-sized pipeline folder with random weights, for timing on any machine (issue 4).

The UNet and VAE have Stable Diffusion 2.1-base's exact configurations (865 M + 84 M parameters,
512 px, 64 x 64 latents); the text encoder is a one-layer CLIP of width 1024 on a small vocabulary
(the real OpenCLIP-H runs once per prompt, not per step, so it does not change per-image ratios).
Nothing is downloaded. Usage:

    .venv/bin/python scripts/random_sd21.py --out /tmp/sd21-random
    noiserefine bench --model /tmp/sd21-random --refiner /tmp/sd21-random/refiner.safetensors \
        --rows gaussian,refined --n 1 --batch-size 1 --out runs/bench-sd21

The refiner is the paper's SD 2.1 architecture (LoRA rank 128, teacher CFG 7.5), untrained: its
cost, not its output, is what the bench measures; bench adds the teacher's CFG row.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from noiserefine.backbones.stable_diffusion import StableDiffusionBackbone
from noiserefine.methods.refine import NoiseRefiner, RefinerConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from sd_components import MAX_LENGTH, SCHEDULER_CONFIG, tiny_tokenizer  # noqa: E402

SD21_BASE_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    use_linear_projection=True, norm_num_groups=32)
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def build() -> StableDiffusionPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD21_BASE_UNET).eval()
    vae = AutoencoderKL(**SD_VAE).eval()
    tokenizer = tiny_tokenizer()
    text = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=1024, intermediate_size=4096,
        num_attention_heads=16, num_hidden_layers=1, max_position_embeddings=MAX_LENGTH,
        vocab_size=len(tokenizer))).eval()
    return StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer,
                                   scheduler=DDIMScheduler(**SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    pipe = build()
    print(f"UNet {sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.0f} M parameters", flush=True)
    pipe.save_pretrained(args.out)
    backbone = StableDiffusionBackbone.from_pipeline(pipe, resolution=512)
    teacher = {"cfg": [7.5], "pag": 0.0, "steps": 20, "scheduler": "ddim"}
    NoiseRefiner(backbone, RefinerConfig(rank=128, alpha=128.0, teacher=teacher)).save(args.out / "refiner.safetensors")
    print(args.out)


if __name__ == "__main__":
    main()
