"""`--dry-run` plans of targets and train, and presets that supply their seeds (issue 14, item 6)."""

from __future__ import annotations

import re

import pytest
import torch
from click.testing import CliRunner
from diffusers import UNet2DConditionModel
from sd_components import make_tiny_sd_pipe

from noiserefine.cli import main
from noiserefine.plan import REFERENCES, MachineCost, Plan, reference_for

SD21_UNET = dict(  # stabilityai/stable-diffusion-2-1's unet/config.json (the entries that shape it)
    in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    ws = tmp_path_factory.mktemp("plan")
    make_tiny_sd_pipe().save_pretrained(ws / "sd")
    (ws / "prompts.csv").write_text("id,caption\n1,a red circle\n2,a blue square\n3,a photo of a cat\n")
    return ws


def invoke(args: list[str]):
    result = CliRunner().invoke(main, args)
    return result.exit_code, result.output


def test_targets_dry_run_on_a_tiny_model(workspace):
    code, out = invoke(["targets", "--model", str(workspace / "sd"), "--prompt-file", str(workspace / "prompts.csv"),
                        "--prompt-column", "caption", "--seeds", "0-9", "--cfg", "5", "--pag", "3", "--steps", "4",
                        "--score", "none", "--out", str(workspace / "targets"), "--dry-run"])
    assert code == 0, out
    assert "10 targets of 3 prompts (1 shards of 256, batch 64)" in out
    assert "model evaluations: 120 (12 per target: cfg5+pag3, 4 ddim steps, trailing spacing)\n" in out  # no decodes
    per_target = 2 * 4 * 32 * 32 * 4 + 16  # x_T and x_0 in float32, cfg, score, index
    assert f"({per_target:,} bytes per target" in out
    assert re.search(r"this machine \(cpu, float32\): .* \(measured here at batch \d+: ", out)
    assert "GPU classes: no reference measurement for this denoiser" in out  # a tiny UNet is not SD 2.1
    assert not (workspace / "targets").exists()  # a plan makes nothing


def test_preset_supplies_its_seeds(workspace):
    """`targets --preset sd21` runs without --seeds (the docs' recipe); without a preset --seeds is required."""
    code, out = invoke(["targets", "--preset", "sd21", "--model", str(workspace / "sd"), "--prompt-file",
                        str(workspace / "prompts.csv"), "--prompt-column", "caption", "--out",
                        str(workspace / "targets"), "--dry-run"])
    assert code == 0, out
    assert "62,500 targets of 3 prompts (245 shards of 256, batch 16)" in out  # seeds 0-62499
    assert "model evaluations: 3,750,000 (60 per target: cfg7+pag3, 20 ddim steps" in out
    assert "+ 62,500 VAE decodes" in out and "in bfloat16" in out  # aesthetic score, bf16: the preset's
    code, out = invoke(["targets", "--model", str(workspace / "sd"), "--prompt-file", str(workspace / "prompts.csv"),
                        "--prompt-column", "caption", "--out", str(workspace / "targets")])
    assert code == 2 and out.strip() == "error: --seeds is required (or a --preset that sets them)"


def test_train_dry_run_counts_samples_and_evaluations(workspace, monkeypatch):
    """Counts, and the GPU lines of the model's reference (here one made for the tiny UNet: the
    refiner's LoRA must not hide the model from its reference)."""
    import noiserefine.plan as plan

    params = sum(p.numel() for p in make_tiny_sd_pipe().unet.parameters())
    tiny = plan.Reference("tiny SD", params, (4, 32, 32), 0.01, "a test's")
    monkeypatch.setattr(plan, "REFERENCES", (tiny,))
    code, out = invoke(["train", "--preset", "sd21", "--model", str(workspace / "sd"), "--targets",
                        str(workspace / "targets"), "--out", str(workspace / "run"), "--dry-run"])
    assert code == 0, out
    assert "300,000 target samples (9,375 steps of 32)" in out  # 6 epochs of 50K at batch 32
    # 11 forwards (refiner + N = 10), a backward through the refiner's (2) and its recompute (checkpointing)
    assert "model evaluations: 4,200,000 (14 per sample" in out
    assert "RTX 3090: 12 h (reference: a test's: 10 ms per evaluation)" in out  # 4.2M x 10 ms
    assert not (workspace / "run").exists()


def test_gpu_hours_come_from_the_reference_for_its_architecture():
    """A denoiser of SD 2.1's size on 4 x 96 x 96 latents gets the paper's RTX 3090 time per
    evaluation; other cards a range, never a single invented figure."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD21_UNET)

    class Stub:
        denoiser, latent_shape = unet, (4, 96, 96)

    sd21 = reference_for(Stub())
    assert sd21 is REFERENCES[0] and "Tab. 7" in sd21.source
    Stub.latent_shape = (4, 64, 64)  # SD 2.1 at 512 px: not the measured case
    assert reference_for(Stub()) is None
    plan = Plan("targets", "62,500 targets", 3_750_000, "60 per target", 62_500, 9_200_000_000, "bf16",
                MachineCost("cpu", "bfloat16", 1, 10.0, 5.0), sd21)
    text = plan.format()
    assert "RTX 3090: 71 h (reference: NoiseRefine paper, Tab. 7" in text  # 3.75M x 1.357 s / 20
    assert re.search(r"A100 80GB SXM: \d+ h to \d+ h \(assumed 2.2x to 4.4x an RTX 3090", text)
    assert "this machine (cpu, bfloat16): 11000 h" in text  # 3.75M x 10 s + 62,500 x 5 s = 10,503 h
