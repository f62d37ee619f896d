"""`--model PATH_OR_ID` -> a backbone. The default is the embedded shapes16 model."""

from __future__ import annotations

from pathlib import Path

from noiserefine.backbones.base import Backbone
from noiserefine.errors import NoiseRefineError


def load_backbone(model: str | None = None) -> Backbone:
    """None or "shapes16": the shipped embedded model; a `.safetensors` file: shapes16 weights;
    a diffusers pipeline folder (model_index.json) or hub id: the matching real-model adapter."""
    from noiserefine.backbones.shapes16 import Shapes16Backbone

    if model in (None, "", "shapes16"):
        return Shapes16Backbone.load()
    path = Path(model)
    if path.suffix == ".safetensors":
        return Shapes16Backbone.load(path)
    if path.is_dir() and not (path / "model_index.json").is_file():
        raise NoiseRefineError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    from noiserefine.backbones.stable_diffusion import StableDiffusionBackbone

    return StableDiffusionBackbone.from_pretrained(model)
