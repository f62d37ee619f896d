"""A refiner beside the user's own LoRAs (issue 14, item 3), with diffusers' `load_lora_weights`
on the tiny SD pipeline: the user's LoRA, loaded before or after attaching, keeps working in every
sampling step; the refiner's adapter is active only for its one evaluation at t = T, where the
user's LoRA is off by default and on with `keep_user_loras`."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from sd_components import make_tiny_sd_pipe

from noiserefine.diffusers_integration import NoiseRefinePipeline, attach_refiner, backbone_from_pipeline, refined_latents
from noiserefine.methods.refine import ADAPTER, NoiseRefiner, RefinerConfig
from noiserefine.sampling import noise_for_seeds

PROMPTS = ["a red circle on the left", "a blue square on the top"]
CALL = {"height": 32, "width": 32, "num_inference_steps": 2, "output_type": "latent", "guidance_scale": 1}
STYLE = "style"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A random style LoRA as diffusers saves one (UNet attention and resnet convs: it shares
    layers with the refiner's LoRA and has its own; and the text encoder), and a refiner folder
    whose every weight is random (LoRA included: at init its B matrices are zero)."""
    folder = tmp_path_factory.mktemp("loras")
    pipe = make_tiny_sd_pipe()
    torch.manual_seed(2)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv_shortcut"]))
    # (transformers' own add_adapter wants peft >= 0.22; peft's inject works on any module)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                       target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]), pipe.text_encoder)
    StableDiffusionPipeline.save_lora_weights(folder / "style", unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                                              text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder))
    refiner = NoiseRefiner(backbone_from_pipeline(make_tiny_sd_pipe(), resolution=32), RefinerConfig(rank=2))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in refiner.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    refiner.save_pretrained(folder / "refiner")
    return folder


@pytest.fixture(scope="module")
def reference(files):
    """Without any refiner: the plain and the styled pipeline's samples of the Gaussian noise, the
    refined noise of the plain model, and the styled pipeline's sample of that refined noise."""
    gaussian = noise_for_seeds([3, 4], (4, 16, 16))
    plain = make_tiny_sd_pipe()
    styled = with_style(make_tiny_sd_pipe(), files)
    refined = refined_latents(attach_refiner(make_tiny_sd_pipe(), files / "refiner", resolution=32), PROMPTS, x_T=gaussian)
    return {"gaussian": gaussian, "refined": refined,
            "plain": plain(PROMPTS, latents=gaussian.clone(), **CALL).images,
            "styled": styled(PROMPTS, latents=gaussian.clone(), **CALL).images,
            "styled_refined": styled(PROMPTS, latents=refined.clone(), **CALL).images}


def with_style(pipe, files):
    pipe.load_lora_weights(files / "style", adapter_name=STYLE)
    return pipe


def user_lora_grads(pipe) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in pipe.unet.named_parameters() if f".{STYLE}." in n}


@pytest.mark.parametrize("order", ["lora_then_refiner", "refiner_then_lora"])
def test_user_lora_works_in_sampling_and_is_off_at_T(files, reference, order):
    pipe = make_tiny_sd_pipe()
    if order == "lora_then_refiner":
        grads = user_lora_grads(with_style(pipe, files))
        refiner = attach_refiner(pipe, files / "refiner", resolution=32)
        assert user_lora_grads(pipe) == grads  # attaching left the user's LoRA as it was
    else:
        refiner = attach_refiner(pipe, files / "refiner", resolution=32)
        with_style(pipe, files)
    gaussian = reference["gaussian"]
    assert (reference["styled"] - reference["plain"]).abs().max() > 1e-2  # the style LoRA does matter

    # The pipeline's own sampling: the user's LoRA on, the refiner's adapter inactive.
    torch.testing.assert_close(pipe(PROMPTS, latents=gaussian.clone(), **CALL).images, reference["styled"],
                               atol=1e-5, rtol=0)
    # The refiner's evaluation at t = T: the base model and the refiner's adapter only, bit for bit.
    assert torch.equal(refined_latents(refiner, PROMPTS, x_T=gaussian), reference["refined"])
    # The wrapper: refined noise of the base model, sampled with the user's LoRA.
    wrapped = NoiseRefinePipeline.from_pipe(pipe, refiner)(PROMPTS, latents=gaussian, **CALL).images
    torch.testing.assert_close(wrapped, reference["styled_refined"], atol=1e-5, rtol=0)
    # Training is untouched: the refiner's weights stay trainable through all the switching.
    assert all(p.requires_grad for p in refiner.trainable_parameters())
    assert pipe.get_active_adapters() == [STYLE]


def test_keep_user_loras_evaluates_the_refiner_on_the_styled_model(files, reference):
    """Oracle: the user's LoRA fused into the base weights, the refiner attached after it."""
    fused = with_style(make_tiny_sd_pipe(), files)
    fused.fuse_lora()
    fused.unload_lora_weights()
    want = refined_latents(attach_refiner(fused, files / "refiner", resolution=32, force=True), PROMPTS,
                           x_T=reference["gaussian"])

    pipe = with_style(make_tiny_sd_pipe(), files)
    refiner = attach_refiner(pipe, files / "refiner", resolution=32, keep_user_loras=True)
    got = refined_latents(refiner, PROMPTS, x_T=reference["gaussian"])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - reference["refined"]).abs().max() > 1e-3  # and not the base model's refinement
    torch.testing.assert_close(pipe(PROMPTS, latents=reference["gaussian"].clone(), **CALL).images,
                               reference["styled"], atol=1e-5, rtol=0)


def test_the_refiner_adapter_stays_inactive_whatever_the_user_switches(files, reference):
    pipe = make_tiny_sd_pipe()
    refiner = attach_refiner(pipe, files / "refiner", resolution=32)
    with_style(pipe, files)
    gaussian = reference["gaussian"]
    pipe.disable_lora()  # the user's LoRA off: the pipeline is the base model, the refiner still refines
    assert torch.equal(pipe(PROMPTS, latents=gaussian.clone(), **CALL).images, reference["plain"])
    assert torch.equal(refined_latents(refiner, PROMPTS, x_T=gaussian), reference["refined"])
    pipe.enable_lora()
    pipe.set_adapters([STYLE, ADAPTER])  # naming the refiner's adapter does not make it a sampling LoRA
    torch.testing.assert_close(pipe(PROMPTS, latents=gaussian.clone(), **CALL).images, reference["styled"],
                               atol=1e-5, rtol=0)
    # Deleting the user's only LoRA makes peft activate a remaining adapter: the refiner's, on the
    # layers the two share; it stays inactive in sampling all the same.
    with pytest.warns(UserWarning, match=f"Setting active adapter to {ADAPTER}"):
        pipe.delete_adapters(STYLE)
    assert torch.equal(pipe(PROMPTS, latents=gaussian.clone(), **CALL).images, reference["plain"])
    assert torch.equal(refined_latents(refiner, PROMPTS, x_T=gaussian), reference["refined"])
