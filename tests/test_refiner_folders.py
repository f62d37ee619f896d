"""Refiners as standard PEFT adapter folders (issue 14, item 1): stock peft opens them and
reproduces the refiner's delta exactly; they round-trip; old single files still load; `train`
writes one; a Hub id that cannot be reached is a clear error."""

from __future__ import annotations

import json

import pytest
import torch
from huggingface_hub import ModelCard
from peft import PeftModel
from sd_components import make_tiny_sd_pipe, make_tiny_sdxl_pipe, tiny_sdxl_unet, tiny_unet

from noiserefine.backbones.shapes16 import Shapes16Backbone
from noiserefine.diffusers_integration import backbone_from_pipeline
from noiserefine.errors import NoiseRefineError
from noiserefine.methods.refine import NoiseRefiner, RefinerConfig
from noiserefine.methods.refiner_folder import hub_id
from noiserefine.sampling import noise_for_seeds

PROMPTS = ["a red circle on the left", "a blue square on the top"]
FILES = {"adapter_config.json", "adapter_model.safetensors", "noiserefine.json", "README.md"}


def perturbed_refiner(backbone, **config) -> NoiseRefiner:
    """A refiner whose every weight (LoRA A and B, delta head, scale projection) is off its init."""
    refiner = NoiseRefiner(backbone, RefinerConfig(**getattr(backbone, "refiner_defaults", {}), **config))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in refiner.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return refiner


@pytest.mark.parametrize("make_pipe, make_unet", [(make_tiny_sd_pipe, tiny_unet), (make_tiny_sdxl_pipe, tiny_sdxl_unet)],
                         ids=["sd", "sdxl"])
def test_stock_peft_opens_the_folder_and_reproduces_the_delta_exactly(tmp_path, make_pipe, make_unet):
    backbone = backbone_from_pipeline(make_pipe(), resolution=32)
    refiner = perturbed_refiner(backbone, rank=2, teacher={"cfg": [5.0], "steps": 2})
    folder = refiner.save_pretrained(tmp_path / "refiner")
    assert {p.name for p in folder.iterdir()} == FILES  # not scale-conditioned: no extra weights file

    peft_unet = PeftModel.from_pretrained(make_unet().eval(), str(folder))  # a fresh base UNet, stock peft
    x_T = noise_for_seeds([0, 1], backbone.latent_shape)
    with torch.no_grad():
        cond = backbone.encode_prompts(PROMPTS)
        ours = refiner.delta(x_T, cond)
        added = {k: cond[k] for k in ("text_embeds", "time_ids") if k in cond}
        theirs = peft_unet(x_T, torch.tensor(refiner.config.timestep), encoder_hidden_states=cond["encoder_hidden_states"],
                           **({"added_cond_kwargs": added} if added else {})).sample
    assert ours.abs().max() > 1e-3
    assert torch.equal(theirs, ours)  # max difference 0.0


def test_round_trip_with_scale_conditioning_and_the_model_card(tiny_shapes16, tmp_path):
    refiner = perturbed_refiner(tiny_shapes16, rank=4, scale_conditioning=True,
                                teacher={"cfg": [1.5, 5.0], "steps": 20})
    folder = refiner.save_pretrained(tmp_path / "r", extra={"training": {"steps": 3, "loss": "msd", "rank": 4}})
    assert (folder / "scale_conditioning.safetensors").is_file()
    meta = json.loads((folder / "noiserefine.json").read_text())
    assert meta["config"]["timestep"] == 999 and meta["config"]["scale_conditioning"]
    assert "rank" not in meta["config"]  # adapter_config.json holds the LoRA's shape, once
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "noiserefine" and "peft" in card.data.tags and card.data.base_model is None
    assert "3 steps" in card.text

    fresh = Shapes16Backbone.create(0)
    loaded = NoiseRefiner.load(fresh, folder)  # every --refiner option goes through `load`
    assert loaded.meta["config"] == refiner.config.to_json() | {"target_modules": sorted(refiner.config.target_modules)}
    assert loaded.meta["training"]["steps"] == 3
    got_weights = loaded.refiner_state_dict()
    for key, value in refiner.refiner_state_dict().items():
        assert torch.equal(got_weights[key], value), key
    x = noise_for_seeds([5, 6], tiny_shapes16.latent_shape)
    with torch.no_grad():
        want = refiner(x, tiny_shapes16.encode_prompts(PROMPTS), guidance_scale=2.0)
        got = loaded(x, fresh.encode_prompts(PROMPTS), guidance_scale=2.0)
    assert torch.equal(got, want)

    # Saved again without scale conditioning into the same folder: the stale scale file goes.
    perturbed_refiner(Shapes16Backbone.create(0), rank=4).save_pretrained(folder)
    assert not (folder / "scale_conditioning.safetensors").exists()


def test_old_single_files_still_load_and_fill_a_refiner_for_further_training(tiny_shapes16, tmp_path):
    refiner = perturbed_refiner(tiny_shapes16, rank=4)
    refiner.save(tmp_path / "old.safetensors")
    refiner.save_pretrained(tmp_path / "new")
    old = NoiseRefiner.load(Shapes16Backbone.create(0), tmp_path / "old.safetensors")
    new = NoiseRefiner.load(Shapes16Backbone.create(0), tmp_path / "new")
    old_weights, new_weights = old.refiner_state_dict(), new.refiner_state_dict()
    for key, value in refiner.refiner_state_dict().items():
        assert torch.equal(old_weights[key], value) and torch.equal(new_weights[key], value), key
    blank = NoiseRefiner(Shapes16Backbone.create(0), RefinerConfig(rank=4))
    blank.load_weights_from(tmp_path / "new")  # train --init-from FOLDER
    assert torch.equal(blank.delta_head.weight, refiner.delta_head.weight)
    with pytest.raises(NoiseRefineError, match="lack .* LoRA weights"):
        NoiseRefiner(Shapes16Backbone.create(0), RefinerConfig(rank=4, target_modules=["to_q", "conv1"])) \
            .load_refiner_state_dict({k: v for k, v in refiner.refiner_state_dict().items() if "conv1" not in k})


def test_refused_and_unreachable_refiners_are_clear_errors(tiny_shapes16, tmp_path):
    perturbed_refiner(tiny_shapes16, rank=4).save_pretrained(tmp_path / "r")
    with pytest.raises(NoiseRefineError, match="trained on"):
        NoiseRefiner.load(Shapes16Backbone.create(seed=7), tmp_path / "r")
    forced = NoiseRefiner.load(Shapes16Backbone.create(seed=7), tmp_path / "r", force=True)
    assert forced.delta_head.weight.abs().sum() > 0
    (tmp_path / "plain").mkdir()
    with pytest.raises(NoiseRefineError, match="not a NoiseRefine refiner folder"):
        NoiseRefiner.from_pretrained(tmp_path / "plain", Shapes16Backbone.create(0))
    with pytest.raises(NoiseRefineError, match="refiner file not found"):
        NoiseRefiner.load(Shapes16Backbone.create(0), tmp_path / "absent.safetensors")
    with pytest.raises(NoiseRefineError, match="no such folder, and not a Hugging Face Hub id"):
        NoiseRefiner.load(Shapes16Backbone.create(0), tmp_path / "absent" / "folder")
    # Offline here (and an unknown repository online): the Hub cannot provide it.
    with pytest.raises(NoiseRefineError, match="the Hugging Face Hub could not provide it"):
        NoiseRefiner.from_pretrained("noiserefine-tests/no-such-refiner", Shapes16Backbone.create(0))


def test_the_card_names_the_hub_model_the_denoiser_came_from():
    cache = "/home/u/.cache/huggingface/hub/models--stabilityai--stable-diffusion-2-1/snapshots/5cae40e/unet"
    assert hub_id(cache) == "stabilityai/stable-diffusion-2-1"
    assert hub_id("stabilityai/stable-diffusion-xl-base-1.0") == "stabilityai/stable-diffusion-xl-base-1.0"
    assert hub_id("/tmp/my-local-sd/unet") is None and hub_id(None) is None


def test_train_writes_a_folder_that_stock_peft_reproduces(tmp_path):
    """`train --out R` writes R/refiner, the standard folder (tiny SD with SD 2.1's leading spacing)."""
    from diffusers import DDIMScheduler

    from noiserefine.guidance import Guidance, Teacher
    from noiserefine.targets import TargetSpec, generate_targets
    from noiserefine.train import TrainConfig, train_refiner

    def backbone():
        pipe = make_tiny_sd_pipe()
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading")
        return backbone_from_pipeline(pipe, resolution=32)

    spec = TargetSpec(PROMPTS, [0, 1], Teacher(Guidance(cfg=5.0), steps=2), shard_size=4)
    generate_targets(backbone(), spec, tmp_path / "targets", batch_size=4, progress=False)
    cfg = TrainConfig(steps=1, batch_size=2, lr=1e-2, msd_steps=2, rank=2, checkpoint_every=10)
    folder = train_refiner(backbone(), tmp_path / "targets", tmp_path / "run", cfg, progress=False)
    assert folder == tmp_path / "run" / "refiner" and {p.name for p in folder.iterdir()} == FILES
    assert not (tmp_path / "run" / "refiner.safetensors").exists()  # the folder only: no second copy

    fresh = backbone()
    refiner = NoiseRefiner.load(fresh, folder)
    manifest = json.loads((tmp_path / "targets" / "manifest.json").read_text())
    assert refiner.meta["config"]["teacher"] == manifest["spec"]["teacher"] and refiner.meta["training"]["steps"] == 1
    peft_unet = PeftModel.from_pretrained(tiny_unet().eval(), str(folder))
    x_T = noise_for_seeds([0, 1], fresh.latent_shape)
    with torch.no_grad():
        cond = fresh.encode_prompts(PROMPTS)
        ours = refiner.delta(x_T, cond)
        theirs = peft_unet(x_T, torch.tensor(999), encoder_hidden_states=cond["encoder_hidden_states"]).sample
    assert ours.abs().max() > 1e-4 and torch.equal(theirs, ours)


def test_the_command_line_samples_with_a_refiner_folder(tmp_path):
    """`sample --method refined --refiner FOLDER` (the same loader serves bench and train --init-from)."""
    from click.testing import CliRunner

    from noiserefine.cli import main

    Shapes16Backbone.create(0).save(tmp_path / "tiny.safetensors")
    perturbed_refiner(Shapes16Backbone.create(0), rank=4).save_pretrained(tmp_path / "refiner")
    (tmp_path / "p.txt").write_text("a red circle on the left\n")
    args = ["sample", "--prompt-file", str(tmp_path / "p.txt"), "--seeds", "0-1", "--steps", "2",
            "--model", str(tmp_path / "tiny.safetensors")]
    result = CliRunner().invoke(main, [*args, "--method", "refined", "--refiner", str(tmp_path / "refiner"),
                                       "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    plain = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "g")])
    assert plain.exit_code == 0, plain.output
    refined, gaussian = ((tmp_path / d / "manifest.jsonl").read_text() for d in ("r", "g"))
    assert '"method": "refined"' in refined and '"method": "gaussian"' in gaussian
    assert (tmp_path / "r" / json.loads(refined.splitlines()[0])["file"]).read_bytes() != \
        (tmp_path / "g" / json.loads(gaussian.splitlines()[0])["file"]).read_bytes()
