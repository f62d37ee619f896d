"""NoiseRefine's refiner: identity at init, one evaluation, strength, save/load, base-model check."""

from __future__ import annotations

import pytest
import torch

from noiserefine.backbones.shapes16 import Shapes16Backbone
from noiserefine.errors import NoiseRefineError
from noiserefine.methods.refine import NoiseRefiner, RefinerConfig
from noiserefine.sampling import noise_for_seeds

PROMPTS = ["a red circle on the left", "a blue square on the top"]


def _perturb(refiner: NoiseRefiner, seed: int = 1) -> None:
    """Move every refiner weight off its initial value, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in refiner.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_identity_at_initialisation(tiny_shapes16):
    refiner = NoiseRefiner(tiny_shapes16)
    x = noise_for_seeds([1, 2], tiny_shapes16.latent_shape)
    cond = tiny_shapes16.encode_prompts(PROMPTS)
    assert torch.equal(refiner(x, cond), x)


def test_refiner_costs_one_denoiser_evaluation_and_leaves_base_untouched(tiny_shapes16):
    bb = tiny_shapes16
    x = noise_for_seeds([1, 2], bb.latent_shape)
    cond = bb.encode_prompts(PROMPTS)
    t = torch.tensor(999)
    with torch.no_grad():
        before = bb.predict(x, t, cond)
    refiner = NoiseRefiner(bb)
    _perturb(refiner)
    calls = []
    hook = bb.denoiser.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        delta = refiner.delta(x, cond)
    hook.remove()
    assert len(calls) == 1 and delta.abs().sum() > 0
    with torch.no_grad():
        assert torch.equal(bb.predict(x, t, cond), before)  # adapter off = base model, bit for bit


def test_strength_scales_the_residual(tiny_shapes16):
    refiner = NoiseRefiner(tiny_shapes16)
    _perturb(refiner)
    x = noise_for_seeds([3], tiny_shapes16.latent_shape)
    cond = tiny_shapes16.encode_prompts(PROMPTS[:1])
    with torch.no_grad():
        d1 = refiner(x, cond, strength=1.0) - x
        d2 = refiner(x, cond, strength=2.5) - x
        d0 = refiner(x, cond, strength=0.0)
    torch.testing.assert_close(d2, 2.5 * d1, rtol=1e-5, atol=1e-6)
    assert torch.equal(d0, x)


def test_lora_weights_stay_trainable_after_sampling_with_adapter_off(tiny_shapes16):
    """peft's disable_adapters() would set requires_grad=False; our toggle must not."""
    refiner = NoiseRefiner(tiny_shapes16)
    cond = tiny_shapes16.encode_prompts(PROMPTS[:1])
    with torch.no_grad():
        tiny_shapes16.predict(noise_for_seeds([0], tiny_shapes16.latent_shape), torch.tensor(500), cond)
    assert all(p.requires_grad for p in refiner.trainable_parameters())


def test_guidance_scale_conditioning_changes_the_output(tiny_shapes16):
    refiner = NoiseRefiner(tiny_shapes16, RefinerConfig(scale_conditioning=True))
    _perturb(refiner)
    x = noise_for_seeds([4], tiny_shapes16.latent_shape)
    cond = tiny_shapes16.encode_prompts(PROMPTS[:1])
    with torch.no_grad():
        a, b = refiner(x, cond, guidance_scale=1.5), refiner(x, cond, guidance_scale=5.0)
    assert (a - b).abs().max() > 1e-6
    with pytest.raises(NoiseRefineError, match="guidance_scale"):
        refiner(x, cond)


def test_save_load_round_trip_is_exact(tiny_shapes16, tmp_path):
    refiner = NoiseRefiner(tiny_shapes16, RefinerConfig(rank=4, scale_conditioning=True))
    _perturb(refiner)
    refiner.save(tmp_path / "r.safetensors")
    x = noise_for_seeds([5, 6], tiny_shapes16.latent_shape)
    cond = tiny_shapes16.encode_prompts(PROMPTS)
    with torch.no_grad():
        want = refiner(x, cond, guidance_scale=2.0)
    fresh = Shapes16Backbone.create(0)
    loaded = NoiseRefiner.load(fresh, tmp_path / "r.safetensors")
    with torch.no_grad():
        got = loaded(x, fresh.encode_prompts(PROMPTS), guidance_scale=2.0)
    assert torch.equal(got, want)
    for k, v in refiner.refiner_state_dict().items():
        assert torch.equal(loaded.refiner_state_dict()[k], v), k


def test_refiner_for_another_base_model_is_refused_unless_forced(tiny_shapes16, tmp_path):
    refiner = NoiseRefiner(tiny_shapes16)
    _perturb(refiner)
    refiner.save(tmp_path / "r.safetensors")
    other = Shapes16Backbone.create(seed=7)
    with pytest.raises(NoiseRefineError, match="trained on"):
        NoiseRefiner.load(other, tmp_path / "r.safetensors")
    forced = NoiseRefiner.load(Shapes16Backbone.create(seed=7), tmp_path / "r.safetensors", force=True)
    assert torch.equal(forced.delta_head.weight, refiner.delta_head.weight)


def test_truncated_refiner_file_is_a_clear_error(tiny_shapes16, tmp_path):
    refiner = NoiseRefiner(tiny_shapes16)
    refiner.save(tmp_path / "r.safetensors")
    data = (tmp_path / "r.safetensors").read_bytes()
    (tmp_path / "r.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(NoiseRefineError, match="truncated or corrupt"):
        NoiseRefiner.load(Shapes16Backbone.create(0), tmp_path / "r.safetensors")


def test_second_refiner_on_same_backbone_is_refused(tiny_shapes16):
    NoiseRefiner(tiny_shapes16)
    with pytest.raises(NoiseRefineError, match="already"):
        NoiseRefiner(tiny_shapes16)
