"""Guidance as one function of the model outputs: none, CFG(w), PAG(s) and CFG+PAG.

All branches of a step go through ONE batched forward: [uncond | cond | cond-perturbed]
(only the branches the spec uses). The combination is diffusers' (Ho & Salimans 2022, Eq. 6;
Ahn et al. 2024, Eq. 8; NoiseRefine Eqs. 31-32):

    out = u + w * (c - u) + s * (c - p)

where u, c, p are the unconditional, conditional and perturbed-attention predictions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from noiserefine.backbones.base import Backbone, Cond, cat_cond
from noiserefine.errors import NoiseRefineError


@dataclass(frozen=True)
class Guidance:
    """A guidance spec. `cfg=1, pag=0` is unguided sampling (one model evaluation per step)."""

    cfg: float = 1.0
    pag: float = 0.0

    def __post_init__(self) -> None:
        if not (self.cfg == self.cfg and self.pag == self.pag) or self.pag < 0:
            raise NoiseRefineError(f"guidance scales must be finite and pag >= 0, got {self}")

    @property
    def uses_uncond(self) -> bool:
        return self.cfg != 1.0

    @property
    def uses_pag(self) -> bool:
        return self.pag != 0.0

    @property
    def branches(self) -> int:
        """Model evaluations per sampler step."""
        return 1 + int(self.uses_uncond) + int(self.uses_pag)

    @property
    def name(self) -> str:
        parts = ([f"cfg{self.cfg:g}"] if self.uses_uncond else []) + (
            [f"pag{self.pag:g}"] if self.uses_pag else [])
        return "+".join(parts) or "unguided"


UNGUIDED = Guidance()


def guided_prediction(backbone: Backbone, x: torch.Tensor, t: torch.Tensor, cond: Cond,
                      uncond: Cond | None, guidance: Guidance) -> torch.Tensor:
    """The guided model output at (x, t): all branches in one batched forward."""
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
    return result
