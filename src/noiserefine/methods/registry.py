"""Every noise method by name, each with its options declared once.

    ctx = MethodContext(backbone, SamplingOptions(Guidance(cfg=2.0)), scorer=my_scorer)
    method = build("noise-diffusion", ctx, rounds=10)
    method = build("refined", ctx, strength=0.5)       # ctx.weights["refined"], or the shipped refiner

The command line's flags (`noiserefine.cli`) and the bench's row tokens (`refined@strength0.5`)
are read off `METHODS`, so a new method is one entry here (plus its module). Search methods
(`searches=True`) sample every candidate with `ctx.sampling` -- the guidance and steps the caller
samples with -- and score it with `ctx.scorer`, which the caller chooses (methods know no scorer:
`noiserefine.evaluation.scorers` builds them by name).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from noiserefine.backbones.base import Backbone
from noiserefine.errors import NoiseRefineError
from noiserefine.generation import GaussianNoise, NoiseMethod, SamplingOptions
from noiserefine.io import shipped_path
from noiserefine.methods.golden import GoldenNoise, NPNet
from noiserefine.methods.noise_diffusion import NoiseDiffusion, NoiseDiffusionConfig
from noiserefine.methods.refine import NoiseRefiner, RefinedNoise
from noiserefine.methods.search import BestOfN
from noiserefine.scoring import Scorer


@dataclass(frozen=True)
class MethodOption:
    """One option of a method: keyword `name` (CLI flag `--name-with-dashes`), default, help, and
    its bench-row token and table label (e.g. `strength` and `s`: `refined@strength0.5`)."""

    name: str
    default: float | int | None
    help: str
    token: str | None = None
    label: str | None = None
    type: type = float

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass
class MethodContext:
    """What a method is built against: the backbone, how candidates/images are sampled, the scorer
    of search methods, weights files by method (a refiner for "refined", an NPNet for "golden";
    default: the backbone's shipped ones) and
    whether weights fitted to another base model are accepted. Weights are loaded once per context
    (a refiner attaches its adapter to the backbone), however many methods are built from it."""

    backbone: Backbone
    sampling: SamplingOptions = SamplingOptions()
    scorer: Scorer | None = None
    weights: Mapping[str, Path] = field(default_factory=dict)
    force: bool = False
    _loaded: dict[str, Any] = field(default_factory=dict, repr=False)

    def load(self, method: str, loader: Callable[[Backbone, Path, bool], Any]) -> Any:
        """`loader(backbone, path, force)` of this context's weights for `method`, loaded once."""
        if method not in self._loaded:
            self._loaded[method] = loader(self.backbone, self.weights_path(method), self.force)
        return self._loaded[method]

    def weights_path(self, method: str) -> Path:
        path = self.weights.get(method)
        if path is not None:
            if not Path(path).exists():
                raise NoiseRefineError(f"{METHODS[method].weights} not found: {path}")
            return Path(path)
        shipped = getattr(self.backbone, "shipped_weights", {}).get(method)
        if shipped is None:
            raise NoiseRefineError(f"method {method!r} needs a {METHODS[method].weights} file for this model "
                                   "(--refiner PATH)")
        return shipped_path(shipped)


@dataclass(frozen=True)
class MethodEntry:
    """A method: its builder `build(ctx, **options)`, its options, the kind of weights file it
    loads (None: none) and whether it searches (samples and scores candidates)."""

    name: str
    build: Callable[..., NoiseMethod]
    options: tuple[MethodOption, ...] = ()
    weights: str | None = None
    searches: bool = False

    def defaults(self) -> dict[str, Any]:
        return {o.name: o.default for o in self.options}


def _refined(ctx: MethodContext, strength: float, teacher_scale: float | None) -> RefinedNoise:
    return RefinedNoise(ctx.load("refined", NoiseRefiner.load), strength, teacher_scale)


def _golden(ctx: MethodContext) -> GoldenNoise:
    return GoldenNoise(ctx.load("golden", NPNet.load), ctx.backbone)


def _noise_diffusion(ctx: MethodContext, rounds: int, candidates: int, threshold: float, gamma_min: float,
                     gamma_max: float) -> NoiseDiffusion:
    config = NoiseDiffusionConfig(rounds, candidates, threshold, gamma_min, gamma_max)
    return NoiseDiffusion(ctx.backbone, _scorer(ctx, "noise-diffusion"), config, ctx.sampling)


def _best_of_n(ctx: MethodContext, budget: int) -> BestOfN:
    return BestOfN(ctx.backbone, _scorer(ctx, "best-of-n"), budget, ctx.sampling)


def _scorer(ctx: MethodContext, method: str) -> Scorer:
    if ctx.scorer is None:
        raise NoiseRefineError(f"method {method!r} searches under a scorer: choose one (--scorer)")
    return ctx.scorer


METHODS: dict[str, MethodEntry] = {e.name: e for e in (
    MethodEntry("gaussian", lambda ctx: GaussianNoise()),
    MethodEntry("refined", _refined, (
        MethodOption("strength", 1.0, "refinement strength s in x_T + s * delta (paper Fig. 13)", "strength", "s"),
        MethodOption("teacher_scale", None, "teacher scale of a scale-conditioned refiner (paper A.4)", "w", "w"),
    ), weights="refiner"),
    MethodEntry("golden", _golden, weights="NPNet"),
    MethodEntry("noise-diffusion", _noise_diffusion, (
        MethodOption("rounds", 10, "Noise Diffusion rounds M (early stop at --threshold)", "rounds", type=int),
        MethodOption("candidates", 16, "candidate noises per round K", type=int),
        MethodOption("threshold", 0.999, "stop an image's search once its score reaches this"),
        MethodOption("gamma_min", 0.05, "smallest step gamma of the distribution-preserving update"),
        MethodOption("gamma_max", 0.9, "largest step gamma"),
    ), searches=True),
    MethodEntry("best-of-n", _best_of_n, (
        MethodOption("budget", 4, "candidate noises per image (scorer calls)", "budget", type=int),
    ), searches=True),
)}


def entry(name: str) -> MethodEntry:
    if name not in METHODS:
        raise NoiseRefineError(f"unknown noise method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]


def build(name: str, ctx: MethodContext, **options: Any) -> NoiseMethod:
    """The noise method `name` built against `ctx`, with `options` over its declared defaults."""
    e = entry(name)
    unknown = sorted(set(options) - set(e.defaults()))
    if unknown:
        raise NoiseRefineError(f"method {name!r} has no option(s) {unknown}; it takes {sorted(e.defaults())}")
    return e.build(ctx, **(e.defaults() | options))


def check_weights(name: str, weights: Path | None) -> None:
    """Refuse a weights file for a method that loads none (it would be silently ignored)."""
    if weights is not None and entry(name).weights is None:
        raise NoiseRefineError(f"method {name!r} loads no weights file; --refiner applies to "
                               f"{', '.join(m.name for m in METHODS.values() if m.weights)}")


def all_options() -> dict[str, MethodOption]:
    """Every method option by name (the CLI offers each once)."""
    return {o.name: o for e in METHODS.values() for o in e.options}
