"""Scale options of refiner training: gradient checkpointing and mixed precision (issue 4), on
tiny real components."""

from __future__ import annotations

import pytest
import torch

from noiserefine.backbones.shapes16 import Shapes16Backbone
from noiserefine.errors import NoiseRefineError
from noiserefine.methods.refine import NoiseRefiner
from noiserefine.sampling import denoise, make_scheduler
from noiserefine.train import RefinerObjective, TrainConfig, train_refiner
from noiserefine.world import ALL_PROMPTS

PROMPTS = list(ALL_PROMPTS[:3])


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one mixed-precision mode per process; these tests change it."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.mark.parametrize("loss", ["msd", "full"])
def test_gradient_checkpointing_gives_the_same_gradients(loss):
    """Checkpointed blocks are recomputed with the adapter state of their own forward pass (the
    refiner's evaluation has it on, the sampler's has it off), so the gradients match exactly."""
    grads = []
    for checkpointing in (False, True):
        bb = Shapes16Backbone.create(0)
        torch.manual_seed(0)
        refiner = NoiseRefiner(bb)
        with torch.no_grad():
            for p in refiner.trainable_parameters():
                p.add_(0.05 * torch.randn_like(p))
        if checkpointing:
            refiner.enable_gradient_checkpointing()
        bb.denoiser.train()
        objective = RefinerObjective(refiner, TrainConfig(loss=loss, msd_steps=2))
        x_T = torch.randn(3, *bb.latent_shape, generator=torch.Generator().manual_seed(1))
        objective(x_T, torch.zeros_like(x_T), PROMPTS, torch.ones(3)).backward()
        grads.append([p.grad.clone() for p in refiner.trainable_parameters()])
    assert any(g.abs().sum() > 0 for g in grads[0])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _bf16_sd_backbone():
    from sd_components import make_tiny_sd_pipe

    from noiserefine.backbones.stable_diffusion import StableDiffusionBackbone

    return StableDiffusionBackbone.from_pipeline(make_tiny_sd_pipe().to(torch.bfloat16), resolution=32)


@pytest.fixture(scope="module")
def bf16_targets(tmp_path_factory):
    from noiserefine.guidance import Guidance, Teacher
    from noiserefine.targets import TargetSpec, generate_targets

    out = tmp_path_factory.mktemp("bf16") / "targets"
    spec = TargetSpec(["a red circle", "a blue square"], [0, 1, 2, 3], Teacher(Guidance(cfg=5.0), steps=2),
                      shard_size=4)
    generate_targets(_bf16_sd_backbone(), spec, out, batch_size=4, progress=False)
    return out


def test_bf16_model_trains_fp32_refiner_under_autocast(bf16_targets, tmp_path):
    backbone = _bf16_sd_backbone()
    base = {k: v.clone() for k, v in backbone.denoiser.state_dict().items()}
    cfg = TrainConfig(steps=2, batch_size=2, lr=1e-2, msd_steps=2, rank=4, checkpoint_every=10,
                      gradient_checkpointing=True)  # mixed precision follows the model: bf16
    path = train_refiner(backbone, bf16_targets, tmp_path / "run", cfg, progress=False)

    refiner_weights = [p for n, p in backbone.denoiser.named_parameters() if "lora_" in n]
    assert refiner_weights and all(p.dtype == torch.float32 for p in refiner_weights)
    after = {k: v for k, v in backbone.denoiser.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(after[k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")]
                           if k not in after else after[k], v) for k, v in base.items())
    assert all(v.dtype == torch.bfloat16 for k, v in after.items())

    fresh = _bf16_sd_backbone()
    refiner = NoiseRefiner.load(fresh, path)
    x = torch.randn(2, *fresh.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond = fresh.encode_prompts(["a red circle", "a blue square"])
        refined = refiner(x, cond)
        sample = denoise(fresh, make_scheduler("ddim", fresh.scheduler_config), refined, cond, steps=2)
    assert torch.isfinite(refined).all() and (refined - x).abs().max() > 1e-3
    assert sample.shape == x.shape and torch.isfinite(sample).all()


def test_low_precision_model_without_autocast_is_refused(bf16_targets, tmp_path):
    cfg = TrainConfig(steps=1, batch_size=2, msd_steps=2, rank=4, mixed_precision="no")
    with pytest.raises(NoiseRefineError, match="mixed precision"):
        train_refiner(_bf16_sd_backbone(), bf16_targets, tmp_path / "run", cfg, progress=False)
