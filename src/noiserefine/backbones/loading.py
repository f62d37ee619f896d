"""`--model PATH_OR_ID` -> a backbone. The default is the embedded shapes16 model.

A diffusers pipeline folder or hub id is dispatched on the `_class_name` in its model_index.json
(one adapter per pipeline class, no chain of model-type checks).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from noiserefine.backbones.base import Backbone, attach_guide
from noiserefine.errors import NoiseRefineError

# model_index.json `_class_name` -> (module, adapter class). A SiT folder is a DiTPipeline folder
# whose scheduler is a FlowMatchEulerDiscreteScheduler (see backbones/dit.py).
FAMILIES: dict[str, tuple[str, str]] = {
    "StableDiffusionPipeline": ("noiserefine.backbones.stable_diffusion", "StableDiffusionBackbone"),
    "StableDiffusionXLPipeline": ("noiserefine.backbones.sdxl", "StableDiffusionXLBackbone"),
    "DiTPipeline": ("noiserefine.backbones.dit", "DiTBackbone"),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load_backbone(model: str | None = None, *, guide: str | None = None, dtype: str | torch.dtype | None = None,
                  device: str | torch.device | None = None, **kw: Any) -> Backbone:
    """None or "shapes16": the shipped embedded model (with its shipped guide model); a
    `.safetensors` file: shapes16 weights; a diffusers pipeline folder (model_index.json) or hub
    id: the adapter for its pipeline class.

    Args:
        guide: a weaker model of the same family for autoguidance, named as `model` is (replaces
            the shipped guide of the embedded model).
        dtype: weights dtype of a real model ("fp32", "fp16", "bf16" or a torch dtype; default fp32).
        device: where a real model goes; default: this process's accelerate device (so each process
            of `accelerate launch` takes its own GPU; the CPU when there is none).
        kw: passed to the adapter's `from_pretrained` (e.g. `resolution=`, `pag_layers=`).
    """
    backbone = _load(model, dtype, device, **kw)
    if guide is not None:
        attach_guide(backbone, _load(guide, dtype, device))
    return backbone


def _load(model: str | None, dtype: str | torch.dtype | None, device: str | torch.device | None,
          **kw: Any) -> Backbone:
    from noiserefine.backbones.shapes16 import Shapes16Backbone

    if model in (None, "", "shapes16"):
        return Shapes16Backbone.load()
    path = Path(model)
    if path.suffix == ".safetensors":
        return Shapes16Backbone.load(path)
    if path.is_dir() and not (path / "model_index.json").is_file():
        raise NoiseRefineError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    adapter = adapter_class(pipeline_class_name(model))
    backbone = adapter.from_pretrained(model, torch_dtype=_dtype(dtype), **kw)
    return _to_device(backbone, device)


def pipeline_class_name(model: str) -> str:
    """`_class_name` of a pipeline folder's model_index.json (or a hub id's; fetched, cached)."""
    from diffusers import DiffusionPipeline

    try:
        config = DiffusionPipeline.load_config(model)
    except (OSError, ValueError) as err:
        raise NoiseRefineError(f"cannot read model_index.json of {model!r}: not a pipeline folder, or a hub id "
                               f"that is unreachable from here ({type(err).__name__})") from None
    return str(config.get("_class_name", ""))


def adapter_class(class_name: str) -> type:
    """The backbone adapter class for a diffusers pipeline class name."""
    if class_name not in FAMILIES:
        raise NoiseRefineError(f"no backbone for pipeline class {class_name!r}; supported: {', '.join(FAMILIES)}")
    module, name = FAMILIES[class_name]
    return getattr(importlib.import_module(module), name)


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise NoiseRefineError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _to_device(backbone: Backbone, device: str | torch.device | None) -> Backbone:
    """Move every module the adapter holds (denoiser, text encoders, VAE) to one device."""
    if device is None:
        from accelerate import PartialState

        # cpu=True on a machine without CUDA: only then does a multi-process launch become a
        # MULTI_CPU (gloo) state; PartialState() would settle for a single non-distributed process.
        device = PartialState(cpu=not torch.cuda.is_available()).device
    for module in vars(backbone).values():
        if isinstance(module, nn.Module):
            module.to(device)
    return backbone
