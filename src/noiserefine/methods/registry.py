"""Noise methods by CLI name, beyond "gaussian" and "refined" (which `api.build_method` builds):

    build("golden", backbone)                          # the shipped NPNet of the shipped shapes16 model
    build("noise-diffusion", backbone, rounds=10)      # scored by the primary shapes16 judge
    build("best-of-n", backbone, budget=4)             # random search at a scorer budget

The search methods score images sampled with their own `cfg`, `pag` and `steps`: give them the
guidance you sample with, so the chosen noise's image is the one that was scored.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable

from noiserefine.backbones.base import Backbone
from noiserefine.errors import NoiseRefineError
from noiserefine.guidance import Guidance
from noiserefine.generation import NoiseMethod
from noiserefine.methods.golden import NPNet, GoldenNoise
from noiserefine.methods.noise_diffusion import NoiseDiffusion, NoiseDiffusionConfig
from noiserefine.methods.search import BestOfN, SearchSampling
from noiserefine.scoring import Scorer


def golden(backbone: Backbone, path: str | Path | None = None, force: bool = False) -> GoldenNoise:
    """NPNet from `path` (default: the shipped shapes16 NPNet); `force` accepts another base model's."""
    return GoldenNoise(NPNet.load(backbone, path, force=force), backbone)


def noise_diffusion(backbone: Backbone, rounds: int = 10, candidates: int = 16, threshold: float = 0.999,
                    gamma_min: float = 0.05, gamma_max: float = 0.9, cfg: float = 1.0, pag: float = 0.0,
                    steps: int = 20, scorer: str = "primary", guidance_start: float = 0.0,
                    guidance_stop: float = 1.0, auto: float = 1.0) -> NoiseDiffusion:
    """Noise Diffusion under the shapes16 judge `scorer` ("primary"; never optimise the judge you grade with)."""
    config = NoiseDiffusionConfig(rounds, candidates, threshold, gamma_min, gamma_max)
    guidance = Guidance(cfg, pag, guidance_start, guidance_stop, auto)
    return NoiseDiffusion(backbone, judge_scorer(scorer, backbone), config, SearchSampling(guidance, steps))


def best_of_n(backbone: Backbone, budget: int = 4, cfg: float = 1.0, pag: float = 0.0, steps: int = 20,
              scorer: str = "primary", guidance_start: float = 0.0, guidance_stop: float = 1.0,
              auto: float = 1.0) -> BestOfN:
    """Best of `budget` noises per image under the shapes16 judge `scorer`."""
    guidance = Guidance(cfg, pag, guidance_start, guidance_stop, auto)
    return BestOfN(backbone, judge_scorer(scorer, backbone), budget, SearchSampling(guidance, steps))


BUILDERS: dict[str, Callable[..., NoiseMethod]] = {
    "golden": golden,
    "noise-diffusion": noise_diffusion,
    "best-of-n": best_of_n,
}


def build(name: str, backbone: Backbone, **opts) -> NoiseMethod:
    """The noise method `name` with options `opts` (each builder's keyword arguments)."""
    if name not in BUILDERS:
        raise NoiseRefineError(f"unknown noise method {name!r}; choose from gaussian, refined, {', '.join(BUILDERS)}")
    builder = BUILDERS[name]
    allowed = [p for p in inspect.signature(builder).parameters if p != "backbone"]
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise NoiseRefineError(f"method {name!r} has no option(s) {unknown}; it takes {allowed}")
    return builder(backbone, **opts)


def judge_scorer(kind: str, backbone: Backbone) -> Scorer:
    """The shapes16 judge's differentiable prompt probability, on the backbone's device."""
    from noiserefine.evaluation.judge import load_judge

    return load_judge(kind).to(backbone.device).prompt_probability
