"""Real-model evaluation (issue 14, item 7) on tiny models built from config: CLIP score against
torchmetrics' own code, PickScore on a tiny CLIP, the optional scorers' error paths and registry
wiring, Noise Diffusion and best-of-N under CLIP scorers chosen by name on a tiny SD pipeline, and
`bench --model` saving images and grids and computing FD to a reference folder through torchmetrics.
"""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from sd_components import clip_logits_by_hand, make_tiny_sd_pipe, save_tiny_clip

from noiserefine.cli import main
from noiserefine.diffusers_integration import backbone_from_pipeline
from noiserefine.errors import NoiseRefineError
from noiserefine.evaluation.metrics import frechet_distance
from noiserefine.evaluation.reference import CLIPFeatures, _square
from noiserefine.evaluation.scorers import (
    REGISTRY, SCORERS, CLIPEmbedder, ScorerModels, UnitScorer, load_scorer, scorer_for,
)
from noiserefine.generation import SamplingOptions
from noiserefine.grids import write_grid
from noiserefine.guidance import Guidance
from noiserefine.methods import registry
from noiserefine.methods.noise_diffusion import NoiseDiffusionConfig, optimize_noise
from noiserefine.methods.registry import MethodContext
from noiserefine.methods.search import encode, sample_and_score
from noiserefine.sampling import noise_for_seeds

PROMPTS = ["a red circle on the left", "a blue square on the top", "a photo of a cat", "a dog", "green triangle", "a"]
IMAGES = torch.rand(6, 3, 48, 40, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """Seed 1: on IMAGES x PROMPTS the mean CLIP score is positive while two pairs are negative, the
    case where torchmetrics' max(mean, 0) differs from a mean of clamped scores."""
    return save_tiny_clip(tmp_path_factory.mktemp("clip"), seed=1)


class TorchmetricsCLIP(torch.nn.Module):
    """transformers 5's `get_*_features` return output objects whose `pooler_output` is the projected
    embedding; torchmetrics 1.9 expects the tensor (as transformers 4 returned)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs):
        return self.model.get_image_features(*args, **kwargs).pooler_output

    def get_text_features(self, *args, **kwargs):
        return self.model.get_text_features(*args, **kwargs).pooler_output


def test_clip_score_is_torchmetrics(clip_folder):
    pytest.importorskip("torchmetrics")
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    model = TorchmetricsCLIP(CLIPModel.from_pretrained(clip_folder).eval())
    processor = CLIPProcessor.from_pretrained(clip_folder)
    as_uint8 = list(((IMAGES + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
    with torch.no_grad():
        theirs, _ = _clip_score_update(as_uint8, PROMPTS, model, processor)  # 100 * cos per pair
    scorer = load_scorer("clip", clip_model=clip_folder)
    torch.testing.assert_close(scorer(IMAGES, PROMPTS), theirs.clamp(min=0), atol=1e-4, rtol=0.0)
    metric = CLIPScore(model_name_or_path=lambda: (model, processor))
    metric.update(as_uint8, PROMPTS)
    assert bool((theirs < 0).any()) and float(metric.compute()) > 0  # the case that tells the aggregates apart
    assert scorer.row_score(IMAGES, PROMPTS) == pytest.approx(float(metric.compute()), abs=1e-4)


def test_pickscore_on_a_tiny_clip(clip_folder):
    scorer = load_scorer("pickscore", pickscore_model=clip_folder)
    logits, _ = clip_logits_by_hand(clip_folder, scorer.clip.processor, scorer.clip.tokenizer, IMAGES, PROMPTS)
    # PickScore's reference code: logit_scale.exp() * (normalised text @ normalised image), the diagonal.
    torch.testing.assert_close(scorer(IMAGES, PROMPTS), logits.diagonal(), atol=1e-3, rtol=0.0)


def test_gradients_and_search_range(clip_folder):
    scorer = load_scorer("clip", clip_model=clip_folder)
    images = IMAGES.clone().requires_grad_(True)
    cos = scorer.clip.cosine(images, PROMPTS)
    (grad,) = torch.autograd.grad(cos.sum(), images)
    assert grad.abs().sum() > 0
    # torch resizing instead of the processor's PIL path: the same scores up to resampling.
    torch.testing.assert_close(cos.detach(), scorer.clip.cosine(IMAGES, PROMPTS), atol=5e-3, rtol=0.0)
    searcher = load_scorer("clip", clip_model=clip_folder, search=True)
    torch.testing.assert_close(searcher(IMAGES, PROMPTS), scorer(IMAGES, PROMPTS) / 100)


def test_optional_scorers_name_what_is_missing(monkeypatch, tmp_path):
    assert {"pickscore", "hpsv2", "imagereward"} <= set(SCORERS)
    with pytest.raises(NoiseRefineError, match="needs a local model path: --hpsv2-model"):
        load_scorer("hpsv2")
    with pytest.raises(NoiseRefineError, match="needs a local model path: --imagereward-model"):
        load_scorer("imagereward")
    with pytest.raises(NoiseRefineError, match="unknown scorer model option"):
        load_scorer("clip", clip_path=tmp_path)
    monkeypatch.setitem(sys.modules, "hpsv2", None)  # not installed
    monkeypatch.setitem(sys.modules, "ImageReward", None)
    with pytest.raises(NoiseRefineError, match="needs the 'hpsv2' package.*pip install hpsv2"):
        load_scorer("hpsv2", hpsv2_model=tmp_path / "HPS_v2.1_compressed.pt")
    with pytest.raises(NoiseRefineError, match="needs the 'image-reward' package.*pip install image-reward"):
        load_scorer("imagereward", imagereward_model=tmp_path)
    # Installed packages, missing weights: the file is named.
    for name in ("hpsv2", "hpsv2.src", "hpsv2.src.open_clip", "ImageReward", "ImageReward.ImageReward"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    with pytest.raises(NoiseRefineError, match="HPSv2 checkpoint not found: .*HPS_v2.1_compressed.pt"):
        load_scorer("hpsv2", hpsv2_model=tmp_path / "HPS_v2.1_compressed.pt")
    with pytest.raises(NoiseRefineError, match="ImageReward folder file not found: .*ImageReward.pt"):
        load_scorer("imagereward", imagereward_model=tmp_path)
    # Noise Diffusion needs gradients: the PIL-based scorers refuse images that carry them.
    searcher = UnitScorer(lambda images, prompts: torch.zeros(len(prompts)), REGISTRY["hpsv2"])
    with pytest.raises(NoiseRefineError, match="needs a differentiable scorer; hpsv2"):
        searcher(IMAGES.clone().requires_grad_(True), PROMPTS)
    assert searcher(IMAGES, PROMPTS).shape == (6,)  # best-of-n scores without gradients


@pytest.mark.parametrize("name", ["clip", "pickscore"])
def test_searches_run_on_tiny_sd_with_a_clip_scorer(clip_folder, name):
    backbone = backbone_from_pipeline(make_tiny_sd_pipe(), resolution=32)
    models = ScorerModels(**{f"{name}_model": clip_folder})
    scorer = scorer_for(backbone, name, models, search=True)
    sampling = SamplingOptions(Guidance(cfg=2.0), steps=2, batch_size=2)
    prompts, seeds = PROMPTS[:2], [0, 1]
    x_T = noise_for_seeds(seeds, backbone.latent_shape)
    result = optimize_noise(backbone, scorer, x_T, prompts, NoiseDiffusionConfig(rounds=3, candidates=2), sampling)
    assert bool(((result.score >= 0) & (result.score <= 1)).all()) and int(result.rounds.sum()) > 2
    cond, uncond = encode(backbone, prompts, sampling)
    again = sample_and_score(backbone, scorer, result.noise.clone().requires_grad_(True), cond, uncond, prompts,
                             sampling, grad_mode="msd")
    torch.testing.assert_close(again.detach(), result.score, atol=1e-5, rtol=0.0)  # the kept noise has its score

    ctx = MethodContext(backbone, sampling, scorer)
    best = registry.build("best-of-n", ctx, budget=3)(x_T, prompts)
    with torch.no_grad():
        chosen = sample_and_score(backbone, scorer, best, cond, uncond, prompts, sampling)
        first = sample_and_score(backbone, scorer, x_T, cond, uncond, prompts, sampling)
    assert bool((chosen >= first - 1e-6).all())  # candidate 1 is x_T itself; the best is kept


def test_search_scorer_by_name_from_the_command_line(clip_folder, tmp_path):
    make_tiny_sd_pipe().save_pretrained(tmp_path / "sd")
    (tmp_path / "p.txt").write_text("a red circle on the left\n")
    for method, extra in [("best-of-n", ["--budget", "2"]), ("noise-diffusion", ["--rounds", "2", "--candidates", "2"])]:
        result = CliRunner().invoke(main, [
            "sample", "--model", str(tmp_path / "sd"), "--prompt-file", str(tmp_path / "p.txt"), "--seeds", "0-1",
            "--steps", "2", "--method", method, *extra, "--scorer", "pickscore", "--pickscore-model", str(clip_folder),
            "--out", str(tmp_path / method)])
        assert result.exit_code == 0, result.output
        assert len((tmp_path / method / "manifest.jsonl").read_text().splitlines()) == 2


def test_bench_saves_images_grids_and_fd_to_a_reference_folder(clip_folder, tmp_path):
    pytest.importorskip("torchmetrics")
    make_tiny_sd_pipe().save_pretrained(tmp_path / "sd")
    reference = tmp_path / "reference"
    reference.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):  # different sizes and formats, as a real reference folder has
        Image.fromarray(rng.integers(0, 256, (40 + i, 36, 3), dtype=np.uint8)).save(
            reference / f"{i:02d}.{'jpg' if i % 3 else 'png'}", quality=95)
    out = tmp_path / "bench"
    result = CliRunner().invoke(main, [
        "bench", "--model", str(tmp_path / "sd"), "--rows", "gaussian@steps2,gaussian@cfg3+steps2", "--n", "20",
        "--batch-size", "10", "--clip-model", str(clip_folder), "--pickscore-model", str(clip_folder),
        "--reference", str(reference), "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "bench.json").read_text())
    assert report["meta"]["fd_features"] == f"FD_CLIP ({clip_folder.name})"
    assert f"FD_CLIP ({clip_folder.name}) to 24 reference images" in result.output and "PickScore" in result.output

    features = CLIPFeatures(CLIPEmbedder(clip_folder))
    files = sorted(reference.iterdir())
    ref = features(torch.from_numpy(np.stack([_square(np.asarray(Image.open(f).convert("RGB")), 32) for f in files])))
    for row, slug in zip(report["rows"], ["gaussian_unguided_2_steps", "gaussian_cfg3_2_steps"]):
        folder = out / "images" / slug
        manifest = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
        assert [m["seed"] for m in manifest] == list(range(1_000_000, 1_000_020))
        saved = np.stack([_square(np.asarray(Image.open(folder / m["file"])), 32) for m in manifest])
        gen = features(torch.from_numpy(saved))
        # An independent FD (scipy's matrix square root) on the features of the saved PNGs.
        assert row["fd"] == pytest.approx(frechet_distance(ref.double().numpy(), gen.double().numpy()), rel=1e-3)
        assert 0 <= row["clip_score"] <= 100 and "pickscore" in row
        grid = Image.open(out / "grids" / f"{slug}.png")
        assert grid.size[0] > 4 * 256 and grid.size[1] > 4 * 256  # 16 tiles in a 4 x 4 grid, with captions
    assert report["rows"][0]["fd"] != report["rows"][1]["fd"]


def test_bench_reference_errors_leave_no_folder(clip_folder, tmp_path):
    make_tiny_sd_pipe().save_pretrained(tmp_path / "sd")
    one = tmp_path / "one"
    one.mkdir()
    Image.new("RGB", (8, 8)).save(one / "a.png")
    (tmp_path / "inception.pth").write_bytes(b"")
    cases = [(["--reference", str(tmp_path / "nowhere")], "reference folder not found"),
             (["--reference", str(one)], "holds 1 image"),
             (["--reference", str(tmp_path)], "holds 0 image"),
             (["--reference", str(tmp_path / "sd" / "unet"), "--clip-model", str(clip_folder)], "holds 0 image")]
    ref = tmp_path / "ref"
    ref.mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(ref / f"{i}.png")
    cases.append((["--reference", str(ref)], "needs a feature model: --fd-model"))
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        cases.append((["--reference", str(ref), "--fd-model", str(tmp_path / "inception.pth")], "torch-fidelity"))
    for args, message in cases:
        result = CliRunner().invoke(main, ["bench", "--model", str(tmp_path / "sd"), "--rows", "gaussian@steps2",
                                           "--n", "2", "--out", str(tmp_path / "bench"), *args])
        assert result.exit_code == 2 and message in result.output, (args, result.output)
        assert not (tmp_path / "bench").exists()


def test_grid_labels(tmp_path):
    tile = np.zeros((16, 16, 3), dtype=np.uint8)
    path = write_grid(tmp_path / "g.png", [[tile, tile], [tile, None]], title="a title", columns=["A", "B"],
                      rows=["first prompt", "second"], captions=[["x", "y"], ["z", ""]], tile_px=64)
    image = np.asarray(Image.open(path))
    assert image.shape[1] == 220 + 2 * (64 + 8) + 8
    assert (image < 128).any()  # text was drawn
    with pytest.raises(NoiseRefineError, match="grid labels do not fit"):
        write_grid(tmp_path / "h.png", [[tile]], title="t", columns=["A", "B"])
