"""Guidance as one function of the model outputs: none, CFG(w), PAG(s), autoguidance(a) and
their sums.

All branches of the model go through ONE batched forward: [uncond | cond | cond-perturbed]
(only the branches the spec uses). The combination is diffusers' (Ho & Salimans 2022, Eq. 6;
Ahn et al. 2024, Eq. 8; NoiseRefine Eqs. 31-32; Karras et al. 2024, "Guiding a diffusion model
with a bad version of itself", Eq. 2, in diffusers' `AutoGuidance` convention):

    out = u + w * (c - u) + s * (c - p) + (a - 1) * (c - g)

where u, c, p are the unconditional, conditional and perturbed-attention predictions and g is the
conditional prediction of the backbone's guide model (`backbone.guide`: a weaker model of the same
family, e.g. an earlier training snapshot), one more forward of that model. With w = 1, s = 0 the
output is g + a * (c - g): autoguidance proper.

A guidance interval (Kynkaenniemi et al. 2024, "Applying guidance in a limited interval improves
sample and distribution quality") switches guidance on only for sampler steps i of N with
int(start * N) <= i < int(stop * N) -- the `start`/`stop` convention of diffusers' guiders; the
other steps evaluate the conditional branch alone (one model evaluation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from noiserefine.backbones.base import Backbone, Cond, cat_cond
from noiserefine.errors import NoiseRefineError

GUIDE_PREFIX = "guide."
"""Conditioning keys of the guide model inside a backbone's conditioning (see `conditioning`)."""


@dataclass(frozen=True)
class Guidance:
    """A guidance spec. `cfg=1, pag=0, auto=1` is unguided sampling (one model evaluation per step);
    `start`/`stop` (fractions of the sampler steps) limit guidance to an interval."""

    cfg: float = 1.0
    pag: float = 0.0
    start: float = 0.0
    stop: float = 1.0
    auto: float = 1.0

    def __post_init__(self) -> None:
        scales = (self.cfg, self.pag, self.start, self.stop, self.auto)
        if not all(math.isfinite(v) for v in scales) or self.pag < 0 or self.auto < 1:
            raise NoiseRefineError(f"guidance scales must be finite, pag >= 0 and auto >= 1, got {self}")
        if not 0.0 <= self.start < self.stop <= 1.0:
            raise NoiseRefineError(f"guidance interval needs 0 <= start < stop <= 1, got {self.start}, {self.stop}")

    @property
    def is_guided(self) -> bool:
        return self.uses_uncond or self.uses_pag or self.uses_auto

    @property
    def limited(self) -> bool:
        """True when guidance is on for only part of the sampler steps."""
        return self.is_guided and (self.start, self.stop) != (0.0, 1.0)

    def active(self, step: int, num_steps: int) -> bool:
        """Whether sampler step `step` (0-based) of `num_steps` is guided (diffusers' guider rule)."""
        return self.is_guided and int(self.start * num_steps) <= step < int(self.stop * num_steps)

    def at_step(self, step: int, num_steps: int) -> "Guidance":
        """The guidance that step `step` of `num_steps` uses: this one, or unguided outside the interval."""
        return self if self.active(step, num_steps) else UNGUIDED

    @classmethod
    def of_teacher(cls, teacher: dict) -> "Guidance":
        """The guidance of a refiner's teacher record (its first CFG scale; older records have no interval)."""
        return cls(float(teacher["cfg"][0]), float(teacher["pag"]), float(teacher.get("guidance_start", 0.0)),
                   float(teacher.get("guidance_stop", 1.0)))

    def nfe(self, num_steps: int) -> int:
        """Model evaluations of a `num_steps`-step sampler run."""
        return sum(self.at_step(i, num_steps).branches for i in range(num_steps))

    @property
    def uses_uncond(self) -> bool:
        return self.cfg != 1.0

    @property
    def uses_pag(self) -> bool:
        return self.pag != 0.0

    @property
    def uses_auto(self) -> bool:
        return self.auto != 1.0

    @property
    def branches(self) -> int:
        """Model evaluations per sampler step (the guide model's counts as one)."""
        return 1 + int(self.uses_uncond) + int(self.uses_pag) + int(self.uses_auto)

    @property
    def name(self) -> str:
        parts = ([f"cfg{self.cfg:g}"] if self.uses_uncond else []) + (
            [f"pag{self.pag:g}"] if self.uses_pag else []) + ([f"auto{self.auto:g}"] if self.uses_auto else [])
        interval = f"[{self.start:g}-{self.stop:g}]" if self.limited else ""
        return "+".join(parts) + interval if parts else "unguided"


UNGUIDED = Guidance()


def conditioning(backbone: Backbone, prompts: Sequence[str], guidance: Guidance) -> Cond:
    """`backbone.encode_prompts(prompts)`, plus, when `guidance` uses autoguidance, the guide
    model's own conditioning of the same prompts under `guide.` keys."""
    cond = backbone.encode_prompts(prompts)
    if guidance.uses_auto:
        check_guide(backbone, guidance)
        cond |= {GUIDE_PREFIX + k: v for k, v in backbone.guide.encode_prompts(prompts).items()}
    return cond


def split_guide(cond: Cond) -> tuple[Cond, Cond]:
    """(the backbone's conditioning, the guide model's) of a conditioning made by `conditioning`."""
    own = {k: v for k, v in cond.items() if not k.startswith(GUIDE_PREFIX)}
    return own, {k[len(GUIDE_PREFIX):]: v for k, v in cond.items() if k.startswith(GUIDE_PREFIX)}


def guided_prediction(backbone: Backbone, x: torch.Tensor, t: torch.Tensor, cond: Cond,
                      uncond: Cond | None, guidance: Guidance) -> torch.Tensor:
    """The guided model output at (x, t): all branches of the model in one batched forward (and
    one forward of the guide model for autoguidance)."""
    check_guide(backbone, guidance)
    cond, guide_cond = split_guide(cond)
    uncond = None if uncond is None else split_guide(uncond)[0]
    b = x.shape[0]
    names = (["uncond"] if guidance.uses_uncond else []) + ["cond"] + (
        ["perturbed"] if guidance.uses_pag else [])
    if guidance.uses_uncond and uncond is None:
        raise NoiseRefineError("CFG needs the unconditional conditioning (uncond=...)")
    conds = [uncond if n == "uncond" else cond for n in names]
    mask = None
    if guidance.uses_pag:
        mask = torch.tensor([n == "perturbed" for n in names], device=x.device).repeat_interleave(b)
    with backbone.perturbed_attention(mask):
        out = backbone.predict(torch.cat([x] * len(names)), t, cat_cond(conds))
    parts = dict(zip(names, out.chunk(len(names))))
    c = parts["cond"]
    result = parts["uncond"] + guidance.cfg * (c - parts["uncond"]) if guidance.uses_uncond else c
    if guidance.uses_pag:
        result = result + guidance.pag * (c - parts["perturbed"])
    if guidance.uses_auto:
        result = result + (guidance.auto - 1.0) * (c - _guide_prediction(backbone, x, t, guide_cond))
    return result


def check_guide(backbone: Backbone, guidance: Guidance) -> None:
    """Fail early when `guidance` uses autoguidance and `backbone` has no guide model."""
    if guidance.uses_auto and getattr(backbone, "guide", None) is None:
        raise NoiseRefineError("autoguidance (auto != 1) needs a guide model: attach one with "
                               "noiserefine.backbones.base.attach_guide(backbone, guide) or pass --guide")


def _guide_prediction(backbone: Backbone, x: torch.Tensor, t: torch.Tensor, guide_cond: Cond) -> torch.Tensor:
    """The guide model's conditional prediction at (x, t), in the backbone's dtype."""
    if not guide_cond:
        raise NoiseRefineError("autoguidance needs the guide's conditioning: encode prompts with "
                               "noiserefine.guidance.conditioning(backbone, prompts, guidance)")
    guide = backbone.guide
    return guide.predict(x.to(guide.dtype), t, guide_cond).to(x.dtype)
