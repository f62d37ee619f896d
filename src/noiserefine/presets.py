"""Named NoiseRefine recipes for real models (paper appendix D), and their merge with CLI flags.

A preset holds, per CLI command (`targets`, `train`, `sample`), option values spelled as that
command's options (click parameter names, CLI value forms such as `seeds="0-62499"`, `cfg="7"`),
so the CLI applies one with a single call before it converts anything:

    params = apply_preset(preset, "train", ctx.params, explicit_options(ctx))

Flags the user typed win over the preset; the preset wins over the CLI's defaults. `sources`
says which values are the paper's and which are ours (the paper does not give batch size,
learning rate, epochs for SDXL/SiT, or how many targets were generated before the top-N cut).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Iterable, Mapping

from noiserefine.errors import NoiseRefineError

COMMANDS = ("targets", "train", "sample")


@dataclass(frozen=True)
class Preset:
    """One recipe. `model` is a hub id, or None where the user must supply a converted folder."""

    name: str
    family: str
    model: str | None
    dtype: str
    prompts: str
    targets: Mapping[str, Any]
    train: Mapping[str, Any]
    sample: Mapping[str, Any]
    sources: Mapping[str, str] = field(default_factory=dict)
    class_prompts: tuple[str, ...] = ()

    def options(self, command: str) -> Mapping[str, Any]:
        if command not in COMMANDS:
            raise NoiseRefineError(f"presets cover the commands {', '.join(COMMANDS)}, not {command!r}")
        return getattr(self, command)

    @property
    def num_targets(self) -> int:
        first, last = self.targets["seeds"].split("-")
        return int(last) - int(first) + 1

    @property
    def kept_targets(self) -> int:
        return round(self.num_targets * self.train.get("keep_fraction", 1.0))


def _steps(epochs: float, kept: int, batch: int) -> int:
    return -(-int(epochs * kept) // batch)


def _frozen(d: dict[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(d)


# SD 2.1 (D.1, D.2.1): LoRA rank 128 on all attention, conv and feed-forward layers; N = 10 MSD
# steps; targets with CFG 7 + PAG 3 in N' = 20 DDIM steps; 50K prompts (20K COCO + 30K Pick-a-Pic)
# kept by aesthetic score; M = 50K, E = 6 epochs (A.7). 768 px: the v-prediction 2.1 model.
_SD21_KEEP, _SD21_KEPT, _SD21_BATCH = 0.8, 50_000, 32
SD21 = Preset(
    name="sd21", family="stable-diffusion", model="stabilityai/stable-diffusion-2-1",
    dtype="bf16",
    prompts="20K MS-COCO + 30K Pick-a-Pic prompts (one per line; not shipped: bring your own file)",
    targets=_frozen({"seeds": f"0-{round(_SD21_KEPT / _SD21_KEEP) - 1}", "cfg": "7", "pag": 3.0, "steps": 20,
                     "scheduler": "ddim", "score": "aesthetic", "shard_size": 256, "batch_size": 16}),
    train=_frozen({"rank": 128, "msd_steps": 10, "scheduler": "ddim", "loss": "msd", "keep_fraction": _SD21_KEEP,
                   "batch_size": _SD21_BATCH, "lr": 1e-4,
                   "mixed_precision": "bf16", "gradient_checkpointing": True,
                   "steps": _steps(6, _SD21_KEPT, _SD21_BATCH)}),
    sample=_frozen({"method": "refined", "cfg": 1.0, "pag": 0.0, "steps": 20, "scheduler": "ddim"}),
    sources=_frozen({
        "rank, msd_steps, cfg, pag, steps (N'), scheduler, kept targets, epochs": "paper D.1, D.2.1, A.7",
        "keep_fraction 0.8 (62.5K generated, top 50K by aesthetic score)": "ours: the paper keeps top-N, "
                                                                          "generated count not given",
        "batch_size 32 (8 GPUs x 4), lr 1e-4, bf16": "ours: usual LoRA settings, not in the paper",
    }),
)

# SDXL (D.1, D.2.1): as SD 2.1 but LoRA rank 256; 181K prompts (55K COCO + 36K Pick-a-Pic + 90K LAION).
_SDXL_KEEP, _SDXL_KEPT, _SDXL_BATCH = 0.8, 181_000, 32
SDXL = Preset(
    name="sdxl", family="stable-diffusion-xl", model="stabilityai/stable-diffusion-xl-base-1.0",
    dtype="bf16",
    prompts="55K MS-COCO + 36K Pick-a-Pic + 90K LAION prompts (bring your own file)",
    targets=_frozen({"seeds": f"0-{round(_SDXL_KEPT / _SDXL_KEEP) - 1}", "cfg": "7", "pag": 3.0, "steps": 20,
                     "scheduler": "ddim", "score": "aesthetic", "shard_size": 256, "batch_size": 8}),
    train=_frozen({"rank": 256, "msd_steps": 10, "scheduler": "ddim", "loss": "msd", "keep_fraction": _SDXL_KEEP,
                   "batch_size": _SDXL_BATCH, "lr": 1e-4,
                   "mixed_precision": "bf16", "gradient_checkpointing": True,
                   "steps": _steps(2, _SDXL_KEPT, _SDXL_BATCH)}),
    sample=_frozen({"method": "refined", "cfg": 1.0, "pag": 0.0, "steps": 20, "scheduler": "ddim"}),
    sources=_frozen({
        "rank 256, msd_steps, cfg, pag, steps (N'), kept targets": "paper D.1, D.2.1",
        "2 epochs (11.3K steps), keep_fraction 0.8, batch_size 32, lr 1e-4, bf16": "ours: not in the paper",
    }),
)

# SiT-XL/2 (D.2.1, D.2.2): classes 1..100, 1K targets per class (100K), CFG 4, Euler 20 steps,
# no filtering. Flow matching: the model folder is a DiTPipeline folder with a
# FlowMatchEulerDiscreteScheduler (see backbones/dit.py and docs/real-models.md).
_SIT_KEPT, _SIT_BATCH = 100_000, 64
SIT_XL_2 = Preset(
    name="sit-xl-2", family="dit", model=None, dtype="bf16",
    prompts="ImageNet class ids 1..100 (built in: prompts are taken in turn, so 1K seeds per class)",
    class_prompts=tuple(str(i) for i in range(1, 101)),
    targets=_frozen({"seeds": f"0-{_SIT_KEPT - 1}", "cfg": "4", "pag": 0.0, "steps": 20, "scheduler": "euler",
                     "score": "none", "shard_size": 256, "batch_size": 64}),
    train=_frozen({"rank": 128, "msd_steps": 10, "scheduler": "euler", "loss": "msd", "keep_fraction": 1.0,
                   "batch_size": _SIT_BATCH, "lr": 1e-4,
                   "mixed_precision": "bf16", "gradient_checkpointing": True,
                   "steps": _steps(6, _SIT_KEPT, _SIT_BATCH)}),
    sample=_frozen({"method": "refined", "cfg": 1.0, "pag": 0.0, "steps": 20, "scheduler": "euler"}),
    sources=_frozen({
        "classes 1-100, 1K per class, cfg 4, Euler 20 steps, no filtering, msd_steps 10": "paper D.2.1, D.1",
        "rank 128 (as SD 2.1), 6 epochs (as SD 2.1), batch_size 64, lr 1e-4, bf16": "ours: not in the paper",
    }),
)

PRESETS: dict[str, Preset] = {p.name: p for p in (SD21, SDXL, SIT_XL_2)}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise NoiseRefineError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]


def apply_preset(name: str | None, command: str, params: Mapping[str, Any], explicit: Iterable[str]) -> dict[str, Any]:
    """`params` (a command's option values, defaults included) with the preset's values for
    `command` filled in wherever the user did not give the flag explicitly. `model` and `dtype`
    (where the command has them) default to the preset's. No preset: `params` unchanged."""
    merged = dict(params)
    if name is None:
        return merged
    preset, explicit = get_preset(name), set(explicit)
    values = dict(preset.options(command))
    if preset.model is not None and "model" in params:
        values["model"] = preset.model
    if "dtype" in params:
        values["dtype"] = preset.dtype
    merged.update({k: v for k, v in values.items() if k not in explicit})
    return merged


def explicit_options(ctx: Any) -> set[str]:
    """Names of the options of a click context that came from the command line or the
    environment (not from their defaults)."""
    from click.core import ParameterSource

    defaults = (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)
    return {name for name in ctx.params if ctx.get_parameter_source(name) not in defaults}
