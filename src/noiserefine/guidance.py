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
import re
from dataclasses import Field, dataclass, field, fields, replace
from typing import Any, Mapping, Sequence

import torch

from noiserefine.backbones.base import Backbone, Cond, cat_cond
from noiserefine.errors import NoiseRefineError

GUIDE_PREFIX = "guide."
"""Conditioning keys of the guide model inside a backbone's conditioning (see `conditioning`)."""


def _option(flag: str, token: str, record: str, help: str) -> dict[str, str]:
    """Field metadata: how one guidance scalar is spelled on the command line (`flag`), in a bench
    row (`token`, e.g. `cfg2`) and in manifests and cards (`record`)."""
    return {"flag": flag, "token": token, "record": record, "help": help}


@dataclass(frozen=True)
class Guidance:
    """A guidance spec. `cfg=1, pag=0, auto=1` is unguided sampling (one model evaluation per step);
    `start`/`stop` (fractions of the sampler steps) limit guidance to an interval.

    Each field is declared once, here: the CLI flags (`noiserefine.cli`), bench-row tokens
    (`parse_token`) and manifest records (`to_record` / `from_record`) are all read off the
    fields' metadata, so a new guidance option is one field plus its term in `guided_prediction`.
    """

    cfg: float = field(default=1.0, metadata=_option("--cfg", "cfg", "cfg", "CFG scale w (1 = off)"))
    pag: float = field(default=0.0, metadata=_option("--pag", "pag", "pag", "PAG scale s (0 = off)"))
    start: float = field(default=0.0, metadata=_option(
        "--guidance-start", "start", "guidance_start", "guide only steps from this fraction of the run on"))
    stop: float = field(default=1.0, metadata=_option(
        "--guidance-stop", "stop", "guidance_stop", "guide only steps before this fraction of the run"))
    auto: float = field(default=1.0, metadata=_option(
        "--auto", "auto", "auto", "autoguidance scale a (1 = off; uses the backbone's guide model)"))

    def __post_init__(self) -> None:
        scales = (self.cfg, self.pag, self.start, self.stop, self.auto)
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in scales) or self.pag < 0 or self.auto < 1:
            raise NoiseRefineError(f"guidance scales must be finite, pag >= 0 and auto >= 1, got {self}")
        if not 0.0 <= self.start < self.stop <= 1.0:
            raise NoiseRefineError(f"guidance interval needs 0 <= start < stop <= 1, got {self.start}, {self.stop}")

    # -- one spelling per place, read off the fields ---------------------------------------------
    @staticmethod
    def options() -> tuple[Field, ...]:
        """The guidance fields with their metadata (flag, token, record, help)."""
        return fields(Guidance)

    def tokens(self) -> list[str]:
        """Bench-row tokens of the fields that differ from unguided sampling (e.g. ['cfg2', 'start0.6'])."""
        return [f"{f.metadata['token']}{getattr(self, f.name):g}" for f in fields(self)
                if getattr(self, f.name) != f.default]

    def to_record(self) -> dict[str, float]:
        """{record name: value} for manifests, cards and bench.json (e.g. `guidance_start`)."""
        return {f.metadata["record"]: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "Guidance":
        """The guidance of a record written by `to_record` (absent keys: the defaults, so records
        written before an option existed read as they were made). Extra keys are ignored."""
        return cls(**{f.name: float(record[f.metadata["record"]]) for f in fields(cls)
                      if f.metadata["record"] in record})

    @classmethod
    def parse_token(cls, token: str) -> tuple[str, float] | None:
        """(field name, value) of a bench-row token such as `cfg2` or `start0.4`; None if `token` is
        no guidance token."""
        for f in fields(cls):
            m = re.fullmatch(re.escape(f.metadata["token"]) + r"([0-9.]+)", token)
            if m:
                try:
                    return f.name, float(m.group(1))
                except ValueError:
                    raise NoiseRefineError(f"bad number in row option {token!r}") from None
        return None

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


@dataclass(frozen=True)
class Teacher:
    """The guided sampling a refiner distils (NoiseRefine section 3.2): its guidance, sampler steps
    N' and scheduler. A guidance-scale-conditioned teacher (appendix A.4) also names the guidance
    field it varies (`scale_field`, e.g. "cfg" or "auto") and the values it takes in turn (`scales`).
    """

    guidance: Guidance = UNGUIDED
    steps: int = 20
    scheduler: str = "ddim"
    scale_field: str = "cfg"
    scales: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.scale_field not in {f.name for f in fields(Guidance)}:
            raise NoiseRefineError(f"unknown guidance field {self.scale_field!r} to vary")
        if self.steps < 1:
            raise NoiseRefineError(f"the teacher needs steps >= 1, got {self.steps}")
        for w in self.scales:
            self.at_scale(w)  # a bad scale fails here, before any work

    def at_scale(self, w: float | None) -> Guidance:
        """The teacher's guidance with its varied field at `w` (None: the guidance as given)."""
        return self.guidance if w is None else replace(self.guidance, **{self.scale_field: float(w)})

    @property
    def conditioned(self) -> bool:
        """Whether the teacher spans several scales (a refiner trained on it is scale-conditioned)."""
        return len(self.scales) > 1

    def row(self, w: float | None = None) -> str:
        """The bench row of this teacher (at scale `w`), e.g. `gaussian@auto3` or `gaussian@cfg2+steps10`."""
        tokens = self.at_scale(w).tokens() + ([f"steps{self.steps}"] if self.steps != 20 else [])
        return "gaussian" + ("@" + "+".join(tokens) if tokens else "")

    def to_record(self) -> dict[str, Any]:
        """A card/manifest record: the guidance record plus steps, scheduler, scales and the row name."""
        return {**self.guidance.to_record(), "steps": self.steps, "scheduler": self.scheduler,
                "scale_field": self.scale_field, "scales": list(self.scales),
                "row": self.row() if not self.conditioned else None}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "Teacher":
        """A teacher from `to_record`'s output, or from the older records that wrote the CFG scale(s)
        as a list `cfg` (one value, or the scales of a conditioned teacher)."""
        record = dict(record)
        scales = tuple(float(w) for w in record.get("scales", ()))
        if isinstance(record.get("cfg"), list):
            cfgs = [float(w) for w in record["cfg"]]
            record["cfg"], scales = cfgs[0], (tuple(cfgs) if len(cfgs) > 1 else ())
        return cls(Guidance.from_record(record), int(record.get("steps", 20)), str(record.get("scheduler", "ddim")),
                   str(record.get("scale_field", "cfg")), scales)


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
