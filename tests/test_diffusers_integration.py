"""The diffusers-native path (refined noise -> `pipe(..., latents=refined, guidance_scale=1)`),
our sampler path for DiT, and the real-image scorers (CLIP score, aesthetic predictor) on tiny
models saved to local folders. Tolerances as in test_oracle_sd.py (float32 round-off).
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMScheduler
from sd_components import make_tiny_dit_pipe, make_tiny_sd_pipe, make_tiny_sdxl_pipe, save_tiny_clip, clip_logits_by_hand

from noiserefine.backbones.dit import DiTBackbone
from noiserefine.diffusers_integration import (
    attach_refiner, backbone_from_pipeline, generate_images, refined_latents,
)
from noiserefine.errors import NoiseRefineError
from noiserefine.evaluation.scorers import AestheticScorer, CLIPScorer, aesthetic_mlp, load_scorer
from noiserefine.guidance import Guidance, Teacher
from noiserefine.io import save_tensors
from noiserefine.methods.refine import NoiseRefiner, RefinerConfig
from noiserefine.sampling import denoise, make_scheduler, noise_for_seeds
from noiserefine.targets import TargetSpec, generate_targets, load_targets

ATOL, RTOL = 1e-4, 0.0
PROMPTS = ["a red circle on the left", "a blue square on the top"]
SEEDS = [3, 4]


def save_random_refiner(pipe, path, **kw) -> None:
    """A refiner whose delta head is random (a trained one is not the identity either)."""
    backbone = backbone_from_pipeline(pipe, **kw)
    refiner = NoiseRefiner(backbone, RefinerConfig(**getattr(backbone, "refiner_defaults", {}), rank=2))
    with torch.no_grad():
        torch.manual_seed(0)
        refiner.delta_head.weight.normal_(std=0.05)
    refiner.save(path)


def trailing_ddim(pipe):
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                               clip_sample=False, set_alpha_to_one=False)
    return pipe


@pytest.mark.parametrize("make_pipe", [make_tiny_sd_pipe, make_tiny_sdxl_pipe], ids=["sd", "sdxl"])
def test_refined_latents_into_pipeline_equal_our_unguided_sampler(tmp_path, make_pipe):
    # 32 px instead of the components' default 64: the pipeline then needs height/width too.
    size = {"height": 32, "width": 32, "num_inference_steps": 2, "output_type": "latent"}
    save_random_refiner(make_pipe(), tmp_path / "refiner.safetensors", resolution=32)
    pipe = trailing_ddim(make_pipe())
    gaussian = noise_for_seeds(SEEDS, (4, 16, 16))
    before = pipe(PROMPTS, latents=gaussian.clone(), guidance_scale=1, **size).images

    # -- the documented path --
    refiner = attach_refiner(pipe, tmp_path / "refiner.safetensors", resolution=32)
    latents = refined_latents(refiner, PROMPTS, seeds=SEEDS)
    images = pipe(PROMPTS, latents=latents, guidance_scale=1, **size).images

    backbone = refiner.backbone
    with torch.no_grad():
        ours = denoise(backbone, make_scheduler("ddim", backbone.scheduler_config), latents,
                       backbone.encode_prompts(PROMPTS), steps=2)
    torch.testing.assert_close(images, ours, atol=ATOL, rtol=RTOL)
    assert (latents - gaussian).abs().max() > 1e-2  # the refiner did change the noise
    # Attaching left the pipeline's own sampling as it was (LoRA off, PAG processors unmasked).
    after = pipe(PROMPTS, latents=gaussian.clone(), guidance_scale=1, **size).images
    torch.testing.assert_close(after, before, atol=ATOL, rtol=RTOL)


def test_refined_latents_arguments(tmp_path):
    save_random_refiner(make_tiny_sd_pipe(), tmp_path / "r.safetensors", resolution=32)
    refiner = attach_refiner(make_tiny_sd_pipe(), tmp_path / "r.safetensors", resolution=32)
    x_T = noise_for_seeds(SEEDS, refiner.backbone.latent_shape)
    torch.testing.assert_close(refined_latents(refiner, PROMPTS, x_T=x_T), refined_latents(refiner, PROMPTS, SEEDS))
    for kwargs, message in [({}, "exactly one"), ({"seeds": [1]}, "2 prompts but 1 seeds")]:
        with pytest.raises(NoiseRefineError, match=message):
            refined_latents(refiner, PROMPTS, **kwargs)
    with pytest.raises(NoiseRefineError, match="no backbone for pipeline class"):
        backbone_from_pipeline(object())


def test_dit_images_through_our_sampler(tmp_path):
    save_random_refiner(make_tiny_dit_pipe(), tmp_path / "dit.safetensors")
    refiner = attach_refiner(make_tiny_dit_pipe(), tmp_path / "dit.safetensors")
    backbone = refiner.backbone
    assert isinstance(backbone, DiTBackbone)
    labels = ["1", "goldfish"]
    images = generate_images(backbone, labels, SEEDS, refiner=refiner, steps=3)
    with torch.no_grad():
        x_hat = refined_latents(refiner, labels, SEEDS)
        expected = backbone.decode(denoise(backbone, make_scheduler("ddim", backbone.scheduler_config), x_hat,
                                           backbone.encode_prompts(labels), steps=3))
    assert images.shape == (2, 3, 16, 16)
    torch.testing.assert_close(images, expected, atol=ATOL, rtol=RTOL)
    plain = generate_images(backbone, labels, SEEDS, steps=3)
    assert (plain - images).abs().max() > 1e-3


# -- real-image scorers ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny CLIP (32x32 images, 16-d projection) saved as a local folder, as users keep ViT-L/14."""
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


def test_clip_score_definition(clip_folder):

    scorer = load_scorer("clip", clip_model=clip_folder)
    assert isinstance(scorer, CLIPScorer)
    images = torch.rand(2, 3, 48, 40, generator=torch.Generator().manual_seed(0)) * 2 - 1
    scores = scorer(images, PROMPTS)
    # By hand: the processor's pixels through CLIPModel.forward's own cosine logits (logit_scale aside).
    logits, scale = clip_logits_by_hand(clip_folder, scorer.clip.processor, scorer.clip.tokenizer, images, PROMPTS)
    cos = logits.diagonal() / scale
    with torch.no_grad():
        ours = (scorer.clip.images(images) * scorer.clip.texts(PROMPTS)).sum(-1)
        swapped = (scorer.clip.images(images) * scorer.clip.texts(PROMPTS[::-1])).sum(-1)
    torch.testing.assert_close(ours, cos, atol=1e-5, rtol=0.0)
    torch.testing.assert_close(scores, (100 * cos).clamp(min=0), atol=1e-4, rtol=0.0)
    assert scores.shape == (2,) and (ours - swapped).abs().max() > 1e-3  # the prompt matters


def test_aesthetic_predictor_and_target_filtering(clip_folder, tmp_path):
    torch.manual_seed(1)
    layers = {0: (16, 8), 2: (8, 4), 4: (4, 1)}  # the LAION layout, shrunk: Linear / Dropout / Linear ...
    state = {f"layers.{i}.{p}": (torch.randn(o, n) if p == "weight" else torch.randn(o))
             for i, (n, o) in layers.items() for p in ("weight", "bias")}
    save_tensors(tmp_path / "aes.safetensors", state)
    scorer = load_scorer("aesthetic", clip_model=clip_folder, aesthetic_model=tmp_path / "aes.safetensors")
    assert isinstance(scorer, AestheticScorer)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    emb = scorer.clip.images(images)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    h = emb
    for i in (0, 2, 4):
        h = h @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    torch.testing.assert_close(scorer(images, ["", "", ""]), h.squeeze(-1), atol=1e-5, rtol=0.0)

    # As the target score (the paper's top-N by aesthetic score, D.2.1).
    backbone = backbone_from_pipeline(make_tiny_sd_pipe(), resolution=32)
    spec = TargetSpec(PROMPTS, [0, 1, 2], Teacher(Guidance(cfg=3.0), steps=2), score="aesthetic")
    generate_targets(backbone, spec, tmp_path / "targets", scorer=scorer, progress=False)
    data = load_targets(tmp_path / "targets", keep_fraction=2 / 3)
    with torch.no_grad():
        expected = scorer(backbone.decode(data.x_0[:]), data.prompts)
    torch.testing.assert_close(data.score, expected, atol=1e-5, rtol=0.0)
    assert len(data) == 2


def test_scorer_errors(clip_folder, tmp_path):
    with pytest.raises(NoiseRefineError, match="CLIP model not found"):
        load_scorer("clip", clip_model=tmp_path / "missing")
    with pytest.raises(NoiseRefineError, match="needs a local model path"):
        load_scorer("clip")
    with pytest.raises(NoiseRefineError, match="aesthetic predictor not found"):
        load_scorer("aesthetic", clip_model=clip_folder, aesthetic_model=tmp_path / "none.safetensors")
    with pytest.raises(NoiseRefineError, match="unknown scorer"):
        load_scorer("vqa", clip_model=clip_folder)
    with pytest.raises(NoiseRefineError, match="not a complete CLIP folder"):
        load_scorer("clip", clip_model=tmp_path)
    with pytest.raises(NoiseRefineError, match="not an aesthetic-predictor"):
        aesthetic_mlp({"weight": torch.zeros(1, 16)})
    wide = {"layers.0.weight": torch.zeros(1, 768), "layers.0.bias": torch.zeros(1)}
    save_tensors(tmp_path / "wide.safetensors", wide)
    with pytest.raises(NoiseRefineError, match="takes 768-d CLIP embeddings"):
        load_scorer("aesthetic", clip_model=clip_folder, aesthetic_model=tmp_path / "wide.safetensors")


def test_bench_on_a_real_model_folder(clip_folder, tmp_path):
    """`noiserefine bench --model FOLDER`: cost columns and CLIP score, the refiner's teacher row added."""
    from click.testing import CliRunner

    from noiserefine.backbones.loading import load_backbone
    from noiserefine.cli import main

    make_tiny_sd_pipe().save_pretrained(tmp_path / "sd")
    backbone = load_backbone(str(tmp_path / "sd"))
    teacher = {"cfg": [7.5], "pag": 0.0, "steps": 2, "scheduler": "ddim"}
    NoiseRefiner(backbone, RefinerConfig(rank=4, teacher=teacher)).save(tmp_path / "refiner.safetensors")
    result = CliRunner().invoke(main, [
        "bench", "--model", str(tmp_path / "sd"), "--refiner", str(tmp_path / "refiner.safetensors"),
        "--rows", "gaussian@steps2,refined@steps2", "--n", "4", "--batch-size", "2",
        "--clip-model", str(clip_folder), "--out", str(tmp_path / "bench")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "bench" / "bench.json").read_text())
    rows = {r["row"]: r for r in report["rows"]}
    assert set(rows) == {"gaussian (unguided, 2 steps)", "gaussian (cfg7.5, 2 steps)", "refined (unguided, 2 steps)"}
    assert report["meta"]["reference_row"] == "gaussian (cfg7.5, 2 steps)"
    assert rows["gaussian (cfg7.5, 2 steps)"]["nfe_per_image"] == 4
    assert rows["refined (unguided, 2 steps)"]["nfe_per_image"] == 3
    assert all(0 <= r["clip_score"] <= 100 and r["sec_per_image"] > 0 and "adherence" not in r for r in rows.values())
    assert "CLIP score" in result.output
