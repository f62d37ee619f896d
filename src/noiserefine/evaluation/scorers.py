"""The one scorer registry: every image scorer by name, over local model files.

A scorer is a callable (images in [-1, 1] (B, 3, H, W), prompts) -> (B,) scores, higher is
better: what target filtering keeps the top-N by (the paper keeps the top-N by aesthetic score,
D.2.1), what NPNet's pairs are filtered with, what Noise Diffusion and best-of-N search under,
and what the real-model bench reports per row. `SCORERS` lists them; `load_scorer(name, ...)`
builds one from `ScorerModels` paths:

- judge: the embedded world's primary judge (its differentiable prompt probability; never the
  held-out judge, which grades).
- clip: CLIP score (Hessel et al. 2021) as torchmetrics' `CLIPScore` defines it, 100 * cos(E_I, E_T)
  with the CLIP model's projected embeddings, clamped at 0 per pair; over a bench row, torchmetrics'
  aggregate max(mean(100 * cos), 0) (`CLIPScorer.row_score`; tests check both against torchmetrics).
  One implementation, here: torchmetrics needs a hub name or a loader callable and returns only
  means, while search and filtering need per-image scores (and gradients).
- aesthetic: the LAION improved aesthetic predictor (Schuhmann 2022), an MLP (Linear layers at
  `layers.0/2/4/6/7`, dropout between, no activations) on the L2-normalised CLIP ViT-L/14 image
  embedding; its weights must be a local safetensors file (see docs/real-models.md).
- pickscore: PickScore (Kirstain et al. 2023), a fine-tuned CLIP-H: exp(logit_scale) * cos(E_I, E_T).
- hpsv2: Human Preference Score v2 (Wu et al. 2023), cos(E_I, E_T) of its open_clip ViT-H-14,
  through the `hpsv2` package and a local checkpoint.
- imagereward: ImageReward (Xu et al. 2023), a BLIP reward model, through the `image-reward`
  package and a local folder (ImageReward.pt + med_config.json).

The Golden Noise paper reports the last three. Nothing downloads: every path must exist locally,
and a missing path or package is a NoiseRefineError naming it.

Searches: Noise Diffusion's adaptive step 1 - sqrt(s) needs scores in [0, 1] and their gradient
w.r.t. the images. `load_scorer(..., search=True)` maps a scorer's scores into [0, 1] by its
entry's monotone `unit` map (best-of-N's choice is unchanged by it); CLIP-based scorers give
gradients (images that require grad are resized in torch, bicubic with antialiasing, instead of the
processor's PIL path); hpsv2 and imagereward score PIL images and serve best-of-N and filtering only.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from noiserefine.backbones.base import Backbone
from noiserefine.errors import NoiseRefineError
from noiserefine.io import load_tensors
from noiserefine.sampling import to_uint8
from noiserefine.scoring import Scorer

ROW_BATCH = 64
"""Images per scorer call when a bench row is scored."""


def _local(path: str | Path | None, what: str) -> Path:
    if path is None:
        raise NoiseRefineError(f"the {what} needs a local model path (nothing is downloaded)")
    path = Path(path)
    if not path.exists():
        raise NoiseRefineError(f"{what} not found: {path} (nothing is downloaded; pass a local folder or file)")
    return path


def _require(module: str, package: str, what: str) -> Any:
    """`module` imported, or a NoiseRefineError naming the pip package `what` needs."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise NoiseRefineError(f"the {what} needs the {package!r} package ({err}): pip install {package}") from None


@dataclass(frozen=True)
class ScorerModels:
    """Local model paths of the real-image scorers (the command line's --clip-model etc.)."""

    clip_model: str | Path | None = None
    aesthetic_model: str | Path | None = None
    pickscore_model: str | Path | None = None
    hpsv2_model: str | Path | None = None
    imagereward_model: str | Path | None = None


MODEL_HELP = {
    "clip_model": "local CLIP folder (CLIPModel + tokenizer + image processor): CLIP score; the aesthetic "
                  "predictor's CLIP ViT-L/14",
    "aesthetic_model": "local LAION aesthetic-predictor safetensors (with --clip-model)",
    "pickscore_model": "local PickScore folder (CLIPModel + tokenizer + image processor, e.g. "
                       "yuvalkirstain/PickScore_v1 saved with the CLIP-H processor)",
    "hpsv2_model": "local HPSv2 checkpoint (HPS_v2.1_compressed.pt; needs the hpsv2 package)",
    "imagereward_model": "local ImageReward folder: ImageReward.pt + med_config.json (needs the image-reward package)",
}
"""Help of each `ScorerModels` field (the CLI's options are read off it)."""


class CLIPEmbedder:
    """Projected, L2-normalised CLIP image and text embeddings from a local transformers folder."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", what: str = "CLIP model") -> None:
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        path = _local(path, what)
        try:
            self.model = CLIPModel.from_pretrained(path, local_files_only=True).to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise NoiseRefineError(f"{path} is not a complete CLIP folder (model, tokenizer, image processor): "
                                   f"{str(err).splitlines()[0]}") from None
        self.model.requires_grad_(False)
        self.device = torch.device(device)

    def images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, D). Images go through uint8 and the processor first, as saved
        PNGs would; images that require grad are resized in torch instead (`pixels_differentiable`)."""
        with torch.set_grad_enabled(images.requires_grad):
            if images.requires_grad:
                pixels = pixels_differentiable(images, self.processor)
            else:
                pixels = self.processor(images=list(to_uint8(images)), return_tensors="pt").pixel_values
            pooled = self.model.vision_model(pixel_values=pixels.to(self.device, self.model.dtype)).pooler_output
            return nn.functional.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    @torch.no_grad()
    def texts(self, prompts: Sequence[str]) -> torch.Tensor:
        max_length = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=max_length,
                                return_tensors="pt").to(self.device)
        pooled = self.model.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output
        return nn.functional.normalize(self.model.text_projection(pooled).float(), dim=-1)

    def cosine(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """(B,) cos(E_I, E_T) of each (image, prompt) pair."""
        if len(prompts) != images.shape[0]:
            raise NoiseRefineError(f"{images.shape[0]} images but {len(prompts)} prompts")
        return (self.images(images) * self.texts(prompts).to(self.device)).sum(-1)


def pixels_differentiable(images: torch.Tensor, processor: Any) -> torch.Tensor:
    """The CLIP processor's resize (shortest edge, bicubic), centre crop and normalisation in torch,
    so gradients reach the images (the processor resizes uint8 PIL images: equal up to resampling)."""
    x = (images.float().clamp(-1, 1) + 1) / 2
    h, w = x.shape[-2:]
    short = processor.size["shortest_edge"]
    size = (short, max(short, int(short * w / h))) if h <= w else (max(short, int(short * h / w)), short)
    x = nn.functional.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
    ch, cw = processor.crop_size["height"], processor.crop_size["width"]
    top, left = (x.shape[-2] - ch) // 2, (x.shape[-1] - cw) // 2
    x = x[..., top: top + ch, left: left + cw]
    mean = torch.tensor(processor.image_mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class CLIPScorer:
    """CLIP score per (image, prompt) pair: 100 * max(cos(E_I, E_T), 0)."""

    name = "clip"

    def __init__(self, clip_model: str | Path, device: str | torch.device = "cpu") -> None:
        self.clip = CLIPEmbedder(clip_model, device)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return (100 * self.clip.cosine(images, prompts)).clamp(min=0).cpu()

    def row_score(self, images: torch.Tensor, prompts: Sequence[str]) -> float:
        """torchmetrics' `CLIPScore` over a set: max(mean over the pairs of 100 * cos, 0)."""
        cos = torch.cat([self.clip.cosine(images[i: i + ROW_BATCH].to(self.clip.device), prompts[i: i + ROW_BATCH])
                         for i in range(0, len(prompts), ROW_BATCH)])
        return max(float(100 * cos.double().mean()), 0.0)


class PickScorer:
    """PickScore: exp(logit_scale) * cos(E_I, E_T) of the PickScore CLIP (its reference code's score)."""

    name = "pickscore"

    def __init__(self, pickscore_model: str | Path, device: str | torch.device = "cpu") -> None:
        self.clip = CLIPEmbedder(pickscore_model, device, what="PickScore model")

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return (self.clip.model.logit_scale.exp().float() * self.clip.cosine(images, prompts)).cpu()


class AestheticScorer:
    """LAION improved aesthetic predictor on CLIP image embeddings; prompts are ignored."""

    name = "aesthetic"

    def __init__(self, aesthetic_model: str | Path, clip_model: str | Path,
                 device: str | torch.device = "cpu") -> None:
        weights = load_tensors(_local(aesthetic_model, "aesthetic predictor"))  # before the slow CLIP load
        self.mlp = aesthetic_mlp(weights).to(device).eval().requires_grad_(False)
        self.clip = CLIPEmbedder(clip_model, device)
        expected = self.mlp[0].in_features
        got = self.clip.model.config.projection_dim
        if expected != got:
            raise NoiseRefineError(f"the aesthetic predictor takes {expected}-d CLIP embeddings, this CLIP gives {got} "
                                   "(the LAION predictor needs CLIP ViT-L/14)")

    def __call__(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        emb = self.clip.images(images).to(self.mlp[0].weight.dtype)
        return self.mlp(emb).squeeze(-1).float().cpu()


def aesthetic_mlp(state: dict[str, torch.Tensor]) -> nn.Sequential:
    """The predictor's `layers` Sequential rebuilt from its weights: Linear where `layers.i.weight`
    exists, identity where the original has Dropout (inference)."""
    indices = sorted({int(k.split(".")[1]) for k in state if k.startswith("layers.") and k.endswith(".weight")})
    if not indices or indices[0] != 0 or set(state) != {f"layers.{i}.{p}" for i in indices for p in ("weight", "bias")}:
        raise NoiseRefineError(f"not an aesthetic-predictor state dict (expected layers.N.weight/bias), "
                               f"got keys {sorted(state)[:4]}...")
    modules: list[nn.Module] = []
    for i in range(indices[-1] + 1):
        if i not in indices:
            modules.append(nn.Identity())
            continue
        w = state[f"layers.{i}.weight"]
        linear = nn.Linear(w.shape[1], w.shape[0])
        linear.load_state_dict({"weight": w, "bias": state[f"layers.{i}.bias"]})
        modules.append(linear)
    if modules[-1].out_features != 1:
        raise NoiseRefineError("the aesthetic predictor's last layer must output one score")
    return nn.Sequential(*modules)


class HPSv2Scorer:
    """HPSv2: cos(E_I, E_T) of the HPS-tuned open_clip ViT-H-14 (the `hpsv2` package's `score`),
    built without its pretrained download and loaded from a local checkpoint."""

    name = "hpsv2"

    def __init__(self, hpsv2_model: str | Path, device: str | torch.device = "cpu") -> None:
        open_clip = _require("hpsv2.src.open_clip", "hpsv2", "HPSv2 scorer")
        path = _local(hpsv2_model, "HPSv2 checkpoint")
        self.device = torch.device(device)
        model, _, self.preprocess = open_clip.create_model_and_transforms(
            "ViT-H-14", None, precision="amp" if self.device.type == "cuda" else "fp32", device=self.device,
            output_dict=True)
        state = _torch_weights(path, "HPSv2 checkpoint")
        model.load_state_dict(state.get("state_dict", state))
        self.model, self.tokenizer = model.eval(), open_clip.get_tokenizer("ViT-H-14")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        from PIL import Image

        pixels = torch.stack([self.preprocess(Image.fromarray(a)) for a in to_uint8(images)]).to(self.device)
        out = self.model(pixels, self.tokenizer(list(prompts)).to(self.device))
        return (out["image_features"] * out["text_features"]).sum(-1).float().cpu()


class ImageRewardScorer:
    """ImageReward's reward (the `image-reward` package's `ImageReward.score`), its model built from a
    local folder instead of `ImageReward.load`, which downloads."""

    name = "imagereward"

    def __init__(self, imagereward_model: str | Path, device: str | torch.device = "cpu") -> None:
        package = _require("ImageReward.ImageReward", "image-reward", "ImageReward scorer")
        folder = _local(imagereward_model, "ImageReward folder")
        weights, config = folder / "ImageReward.pt", folder / "med_config.json"
        for path in (weights, config):
            _local(path, "ImageReward folder file")
        model = package.ImageReward(med_config=str(config), device=str(device))
        model.load_state_dict(_torch_weights(weights, "ImageReward weights"), strict=False)
        self.model = model.to(device).eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        from PIL import Image

        return torch.tensor([float(self.model.score(p, Image.fromarray(a))) for p, a in zip(prompts, to_uint8(images))])


def _torch_weights(path: Path, what: str) -> dict[str, Any]:
    """A published .pt/.pth state dict, read with `weights_only=True` (never unpickling code)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, ... for a bad file
        raise NoiseRefineError(f"{what} {path} is not a plain weights file ({str(err).splitlines()[0]})") from None


@dataclass(frozen=True)
class ScorerEntry:
    """A scorer in the registry: the `ScorerModels` fields it needs, how it is built, its bench
    column as (bench.json key, table label) (None: not a real-image metric), the monotone map of its scores into [0, 1] (`unit`) and
    whether it gives gradients w.r.t. the images (Noise Diffusion needs both)."""

    name: str
    models: tuple[str, ...]
    build: Callable[..., Scorer]
    column: tuple[str, str] | None
    unit: Callable[[torch.Tensor], torch.Tensor]
    differentiable: bool = True


def _judge(device: str | torch.device) -> Scorer:
    from noiserefine.evaluation.judge import load_judge

    return load_judge("primary").to(device).prompt_probability


REGISTRY: dict[str, ScorerEntry] = {e.name: e for e in (
    ScorerEntry("judge", (), _judge, None, lambda s: s),
    ScorerEntry("clip", ("clip_model",), CLIPScorer, ("clip_score", "CLIP score"), lambda s: s / 100),
    ScorerEntry("aesthetic", ("aesthetic_model", "clip_model"), AestheticScorer, ("aesthetic", "aesthetic"),
                lambda s: ((s - 1) / 9).clamp(0, 1)),  # the predictor rates 1-10
    ScorerEntry("pickscore", ("pickscore_model",), PickScorer, ("pickscore", "PickScore"), lambda s: (s / 100).clamp(0, 1)),
    ScorerEntry("hpsv2", ("hpsv2_model",), HPSv2Scorer, ("hpsv2", "HPSv2"), lambda s: s.clamp(0, 1), differentiable=False),
    ScorerEntry("imagereward", ("imagereward_model",), ImageRewardScorer, ("imagereward", "ImageReward"), torch.sigmoid,
                differentiable=False),  # a reward standardised to mean 0, std 1 on its training data
)}
SCORERS = (*REGISTRY, "none")
"""Scorer names: the registry's, or "none" for no scorer."""


class UnitScorer:
    """A scorer's scores mapped into [0, 1] by its entry's `unit` (what searches get)."""

    def __init__(self, scorer: Scorer, entry: ScorerEntry) -> None:
        self.scorer, self.entry, self.name = scorer, entry, entry.name

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if images.requires_grad and not self.entry.differentiable:
            raise NoiseRefineError(f"Noise Diffusion needs a differentiable scorer; {self.entry.name} scores PIL "
                                   "images (use it with best-of-n, or choose clip, pickscore, aesthetic or judge)")
        return self.entry.unit(self.scorer(images, prompts))


def load_scorer(name: str, *, device: str | torch.device = "cpu", search: bool = False,
                **paths: str | Path | None) -> Scorer | None:
    """A scorer by name (`SCORERS`) from local model paths (`ScorerModels` fields as keywords);
    "none" gives None. `search=True`: scores mapped into [0, 1] (`UnitScorer`), for search methods."""
    return scorer_for(None, name, _models(paths), search=search, device=device)


def scorer_for(backbone: Backbone | None, name: str | None = None, models: ScorerModels = ScorerModels(), *,
               search: bool = False, device: str | torch.device | None = None) -> Scorer | None:
    """The scorer `name` on the backbone's device, or, when None, the backbone's own default
    (`backbone.default_scorer`: the judge for the embedded world; none for real models, where the
    user names one). A scorer whose model paths are missing is a NoiseRefineError naming them."""
    name = name or getattr(backbone, "default_scorer", None) or "none"
    if name == "none":
        return None
    if name not in REGISTRY:
        raise NoiseRefineError(f"unknown scorer {name!r}; choose from {', '.join(SCORERS)}")
    entry = REGISTRY[name]
    missing = [m for m in entry.models if getattr(models, m) is None]
    if missing:
        flags = " and ".join("--" + m.replace("_", "-") for m in missing)
        raise NoiseRefineError(f"the {name} scorer needs a local model path: {flags} (nothing is downloaded)")
    device = device if device is not None else getattr(backbone, "device", "cpu")
    scorer = entry.build(*[getattr(models, m) for m in entry.models], device=device) if entry.models \
        else entry.build(device)
    return UnitScorer(scorer, entry) if search else scorer


def _models(paths: dict[str, Any]) -> ScorerModels:
    known = {f.name for f in fields(ScorerModels)}
    unknown = sorted(set(paths) - known)
    if unknown:
        raise NoiseRefineError(f"unknown scorer model option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return ScorerModels(**paths)


def row_scorers(models: ScorerModels, device: str | torch.device = "cpu") -> dict[tuple[str, str], Scorer]:
    """The real-image metrics a bench reports, by column (bench.json key, table label): every registry
    scorer whose model paths are all given (CLIP score with --clip-model, PickScore with --pickscore-model, ...)."""
    return {e.column: scorer_for(None, e.name, models, device=device) for e in REGISTRY.values()
            if e.column and all(getattr(models, m) is not None for m in e.models)}


def row_score(scorer: Scorer, images: torch.Tensor, prompts: Sequence[str]) -> float:
    """A scorer's figure for a set of images: its own `row_score` (CLIP: torchmetrics' aggregate),
    else the mean of its per-image scores, in batches of `ROW_BATCH`."""
    if hasattr(scorer, "row_score"):
        return scorer.row_score(images, prompts)
    scores = [scorer(images[i: i + ROW_BATCH], prompts[i: i + ROW_BATCH]) for i in range(0, len(prompts), ROW_BATCH)]
    return float(torch.cat(scores).double().mean())
