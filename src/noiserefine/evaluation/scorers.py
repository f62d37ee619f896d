"""Real-image scorers over local model folders: CLIP score and the LAION aesthetic predictor.

A scorer is a callable (images in [-1, 1] (B, 3, H, W), prompts) -> (B,) scores, higher is
better: the `Scorer` that `targets.generate_targets` uses to keep the top-N targets (the paper
keeps the top-N by aesthetic score, D.2.1) and that evaluation reports.

- CLIP score (Hessel et al. 2021), as torchmetrics' `CLIPScore` defines it: 100 * max(cos(E_I, E_T), 0)
  with the CLIP model's projected image and text embeddings. torchmetrics is not installed here
  (and pulls torchvision, which can replace the CPU torch), so this is a short transformers
  implementation over a local CLIP folder (`CLIPModel.save_pretrained` + tokenizer + image processor).
- Aesthetic score: the LAION improved aesthetic predictor (Schuhmann 2022), an MLP (Linear layers
  at `layers.0/2/4/6/7`, dropout between, no activations) on the L2-normalised CLIP ViT-L/14
  image embedding. Its weights must be a local safetensors file (convert the published `.pth`
  once, see docs/real-models.md); we never unpickle files from outside.

Nothing downloads: every path must exist locally, or a NoiseRefineError says what is missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from noiserefine.backbones.base import Backbone
from noiserefine.errors import NoiseRefineError
from noiserefine.io import load_tensors
from noiserefine.sampling import to_uint8
from noiserefine.scoring import Scorer


def _local(path: str | Path | None, what: str) -> Path:
    if path is None:
        raise NoiseRefineError(f"the {what} needs a local model path (nothing is downloaded)")
    path = Path(path)
    if not path.exists():
        raise NoiseRefineError(f"{what} not found: {path} (nothing is downloaded; pass a local folder or file)")
    return path


class CLIPEmbedder:
    """Projected, L2-normalised CLIP image and text embeddings from a local transformers folder."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        path = _local(path, "CLIP model")
        try:
            self.model = CLIPModel.from_pretrained(path, local_files_only=True).to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise NoiseRefineError(f"{path} is not a complete CLIP folder (model, tokenizer, image processor): "
                                   f"{str(err).splitlines()[0]}") from None
        self.device = torch.device(device)

    @torch.no_grad()
    def images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, D). Images go through uint8 first, as saved PNGs would."""
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


class CLIPScorer:
    """CLIP score per (image, prompt) pair: 100 * max(cos(E_I, E_T), 0)."""

    name = "clip"

    def __init__(self, clip_model: str | Path, device: str | torch.device = "cpu") -> None:
        self.clip = CLIPEmbedder(clip_model, device)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if len(prompts) != images.shape[0]:
            raise NoiseRefineError(f"{images.shape[0]} images but {len(prompts)} prompts")
        cos = (self.clip.images(images) * self.clip.texts(prompts)).sum(-1)
        return (100 * cos).clamp(min=0).cpu()


class AestheticScorer:
    """LAION improved aesthetic predictor on CLIP image embeddings; prompts are ignored."""

    name = "aesthetic"

    def __init__(self, aesthetic_model: str | Path, clip_model: str | Path,
                 device: str | torch.device = "cpu") -> None:
        weights = load_tensors(_local(aesthetic_model, "aesthetic predictor"))  # before the slow CLIP load
        self.mlp = aesthetic_mlp(weights).to(device).eval()
        self.clip = CLIPEmbedder(clip_model, device)
        expected = self.mlp[0].in_features
        got = self.clip.model.config.projection_dim
        if expected != got:
            raise NoiseRefineError(f"the aesthetic predictor takes {expected}-d CLIP embeddings, this CLIP gives {got} "
                                   "(the LAION predictor needs CLIP ViT-L/14)")

    @torch.no_grad()
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


SCORERS = ("judge", "clip", "aesthetic", "none")
"""Scorer names: the embedded world's primary judge (its differentiable prompt probability; never
the held-out judge, which grades), CLIP score, the aesthetic predictor, or no scorer."""


def load_scorer(name: str, *, clip_model: str | Path | None = None, aesthetic_model: str | Path | None = None,
                device: str | torch.device = "cpu") -> Scorer | None:
    """A scorer by name (`SCORERS`), from local model paths; "none" gives None."""
    if name == "judge":
        from noiserefine.evaluation.judge import load_judge

        return load_judge("primary").to(device).prompt_probability
    if name == "clip":
        return CLIPScorer(clip_model, device)
    if name == "aesthetic":
        return AestheticScorer(aesthetic_model, clip_model, device)
    if name == "none":
        return None
    raise NoiseRefineError(f"unknown scorer {name!r}; choose from {', '.join(SCORERS)}")


def scorer_for(backbone: Backbone, name: str | None = None, *, clip_model: str | Path | None = None,
               aesthetic_model: str | Path | None = None) -> Scorer | None:
    """The scorer `name`, or, when None, the backbone's own default (`backbone.default_scorer`: the
    judge for the embedded world; none for real models, where the user names one)."""
    name = name or getattr(backbone, "default_scorer", None) or "none"
    return load_scorer(name, clip_model=clip_model, aesthetic_model=aesthetic_model, device=backbone.device)
