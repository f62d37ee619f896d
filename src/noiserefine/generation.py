"""High-level generation: prompts x seeds -> images, through a noise method and the sampler."""

from __future__ import annotations

import contextlib
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence, runtime_checkable

import torch
from tqdm.auto import tqdm

from noiserefine.backbones.base import Backbone
from noiserefine.errors import NoiseRefineError
from noiserefine.guidance import UNGUIDED, Guidance, conditioning
from noiserefine.sampling import denoise, make_scheduler, noise_for_seeds


@runtime_checkable
class NoiseMethod(Protocol):
    """A way to choose the initial noise: Gaussian x_T in, (better) initial noise out, same shape.
    `extra_nfe` is its cost in denoiser evaluations per image, on top of sampling (NoiseRefine: 1;
    Gaussian: 0; search methods report their own)."""

    name: str
    extra_nfe: float

    def __call__(self, x_T: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor: ...


class GaussianNoise:
    """The baseline: the Gaussian noise itself."""

    name = "gaussian"
    extra_nfe = 0.0

    def __call__(self, x_T: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return x_T


@dataclass(frozen=True)
class SamplingOptions:
    """How initial noise becomes an image: guidance, sampler steps and scheduler (and the batch
    size of `generate_latents`). Search methods sample the candidates they score with these, so
    give them the options you sample with."""

    guidance: Guidance = UNGUIDED
    steps: int = 20
    scheduler: str = "ddim"
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise NoiseRefineError(f"sampling needs steps >= 1 and a batch size >= 1, got steps={self.steps}, "
                                   f"batch size {self.batch_size}")

    @property
    def nfe(self) -> int:
        """Denoiser evaluations per image for one sample."""
        return self.guidance.nfe(self.steps)


def generate_latents(backbone: Backbone, prompts: Sequence[str], seeds: Sequence[int],
                     method: NoiseMethod | None = None, options: SamplingOptions = SamplingOptions(),
                     progress: bool = False) -> torch.Tensor:
    """One sample per (prompt, seed) pair, in order; the noise of pair i comes from seeds[i]."""
    if len(prompts) != len(seeds):
        raise NoiseRefineError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    method = method or GaussianNoise()
    out = []
    with tqdm(total=len(prompts), disable=not progress, desc=method.name, unit="img") as bar, \
            (progress_notes(bar) if progress else contextlib.nullcontext()):
        for lo in range(0, len(prompts), options.batch_size):
            p = list(prompts[lo: lo + options.batch_size])
            x_T = noise_for_seeds(list(seeds[lo: lo + options.batch_size]), backbone.latent_shape)
            x_T = method(x_T.to(backbone.device, backbone.dtype), p)
            out.append(sample_from_noise(backbone, x_T, p, options))
            bar.update(len(p))
    return torch.cat(out)


@torch.no_grad()
def sample_from_noise(backbone: Backbone, x_T: torch.Tensor, prompts: Sequence[str],
                      options: SamplingOptions) -> torch.Tensor:
    """Latents x_0 from given initial noise (unguided or guided)."""
    cond = conditioning(backbone, prompts, options.guidance)
    uncond = backbone.encode_prompts([""] * len(prompts)) if options.guidance.uses_uncond else None
    sched = make_scheduler(options.scheduler, backbone.scheduler_config)
    step = (lambda i, t, x: progress_note(f"step {i + 1}/{options.steps}")) if _NOTES.get() else None
    return denoise(backbone, sched, x_T, cond, uncond=uncond, guidance=options.guidance, steps=options.steps,
                   callback=step)


class _Notes:
    """Notes shown after a progress bar's count, redrawn at most every 0.2 s."""

    def __init__(self, bar: tqdm, prefix: str) -> None:
        self.bar, self.prefix, self.drawn = bar, prefix, 0.0

    def show(self, text: str) -> None:
        self.bar.set_postfix_str(self.prefix + text, refresh=False)
        if time.monotonic() - self.drawn >= 0.2:
            self.bar.refresh()
            self.drawn = time.monotonic()


_NOTES: ContextVar[_Notes | None] = ContextVar("noiserefine_progress_notes", default=None)


@contextlib.contextmanager
def progress_notes(bar: tqdm | None, prefix: str = "") -> Iterator[None]:
    """Inside the block, `progress_note` texts (the sampler's step, a search method's round)
    show beside `bar`'s count of images, after `prefix` (None: nowhere)."""
    token = _NOTES.set(_Notes(bar, prefix) if bar is not None else None)
    try:
        yield
    finally:
        _NOTES.reset(token)


def progress_note(text: str) -> None:
    """Show `text` beside the progress bar of the running `generate_latents` (or bench), if any."""
    notes = _NOTES.get()
    if notes is not None:
        notes.show(text)
