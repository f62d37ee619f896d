"""NPNet's data (Golden Noise, Stage I): noise pairs (x_T, x_T') by re-denoise sampling, scored.

    x_T' = DDIM-Inversion_{w_w}(DDIM_{w_l}(x_T))

one DDIM step at a high CFG scale w_l from x_T, then that step inverted at a low scale w_w < w_l;
the scale gap injects the prompt's semantics into the noise. A pair is kept when the image sampled
from x_T' beats the image sampled (the same way) from x_T by a margin m: s_0 + m < s_0'. The paper
filters with HPSv2; here the scorer is an argument (shapes16: the primary judge's prompt
probability). Pairs live in a shard store (`noiserefine.shards`): resumable, and the processes of
a multi-process run write disjoint shards. Every pair keeps both scores; filtering is at loading.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from noiserefine.backbones.base import Backbone, Cond, same_model
from noiserefine.errors import NoiseRefineError
from noiserefine.generation import SamplingOptions
from noiserefine.guidance import Guidance, guided_prediction
from noiserefine.inversion import to_eps_x0
from noiserefine.io import OutputFolder
from noiserefine.methods.search import sample_and_score
from noiserefine.sampling import check_noise, make_scheduler, noise_for_seeds
from noiserefine.scoring import Scorer
from noiserefine.shards import Batch, ShardStore, read_manifest, results

RESULTS = results("pairs")
"""What a pair folder holds: the manifest and the shards of `RedenoiseSpec.store`."""


@torch.no_grad()
def redenoise(backbone: Backbone, x_T: torch.Tensor, cond: Cond, uncond: Cond, *, high_cfg: float = 3.0,
              low_cfg: float = 1.0, grid_steps: int = 20) -> torch.Tensor:
    """x_T' = DDIM-Inversion_{low_cfg}(DDIM_{high_cfg}(x_T)) on the trailing DDIM grid of
    `grid_steps` steps: the step T -> t_1 at CFG `high_cfg`, then t_1 -> T inverted at `low_cfg`.

    The inversion queries the model at the point it starts from, (x_1, t_1), as plain DDIM
    inversion does (Song et al. 2020, Eq. 13 run backwards). `inversion.ddim_invert` queries it at
    the target timestep instead; at t = T of a zero-terminal-SNR v-prediction model (shapes16:
    alpha_bar_T ~ 2e-9) that turns the prediction into eps = x_1 whatever the model says, so the low
    scale would have no effect at all.
    """
    check_noise(x_T, backbone.latent_shape)
    if grid_steps < 2:
        raise NoiseRefineError(f"re-denoise sampling needs a grid of >= 2 steps, got {grid_steps}")
    sched = make_scheduler("ddim", backbone.scheduler_config, spacing="trailing")  # its first step starts at T
    sched.set_timesteps(grid_steps, device=x_T.device)
    t_T, t_1 = sched.timesteps[0], sched.timesteps[1]
    x = x_T * sched.init_noise_sigma
    out = guided_prediction(backbone, sched.scale_model_input(x, t_T), t_T, cond, uncond, Guidance(high_cfg))
    x_1 = sched.step(out, t_T, x, return_dict=False)[0]
    out = guided_prediction(backbone, sched.scale_model_input(x_1, t_1), t_1, cond, uncond, Guidance(low_cfg))
    alphas = sched.alphas_cumprod.to(x_T.device, torch.float32)
    eps, x_0 = to_eps_x0(out.float(), x_1.float(), alphas[t_1], backbone.scheduler_config.get("prediction_type", "epsilon"))
    x_T_new = alphas[t_T].sqrt() * x_0 + (1 - alphas[t_T]).sqrt() * eps
    return (x_T_new / sched.init_noise_sigma).to(x_T.dtype)


@dataclass
class RedenoiseSpec:
    """What a pair folder holds; a resumed collection must ask for the same thing. Pair i uses
    prompt i mod len(prompts) and seeds[i]; both of its images are sampled with `filter_cfg` in
    `filter_steps` DDIM steps to score it. `score` names the scorer (a record, not a choice)."""

    prompts: list[str]
    seeds: list[int]
    high_cfg: float = 3.0
    low_cfg: float = 1.0
    grid_steps: int = 20
    filter_cfg: float = 1.0
    filter_steps: int = 20
    shard_size: int = 256
    score: str = "judge"

    def __post_init__(self) -> None:
        if not self.prompts or not self.seeds:
            raise NoiseRefineError("re-denoise sampling needs at least one prompt and one seed")
        if self.high_cfg <= self.low_cfg:
            raise NoiseRefineError(f"re-denoise sampling needs high_cfg > low_cfg, got {self.high_cfg} and {self.low_cfg}")
        if self.grid_steps < 2:
            raise NoiseRefineError(f"re-denoise sampling needs a grid of >= 2 steps, got {self.grid_steps}")
        if self.filter_steps < 1:
            raise NoiseRefineError(f"filter steps must be >= 1, got {self.filter_steps}")

    def pair(self, i: int) -> tuple[str, int]:
        """(prompt, seed) of pair i."""
        return self.prompts[i % len(self.prompts)], self.seeds[i]

    def store(self, folder: Path) -> ShardStore:
        return ShardStore(Path(folder), len(self.seeds), self.shard_size, prefix="pairs", items="pairs")


def collect_pairs(backbone: Backbone, spec: RedenoiseSpec, out: Path, scorer: Scorer, batch_size: int = 64,
                  process: tuple[int, int] = (0, 1), wait_for_everyone: Callable[[], None] = lambda: None,
                  overwrite: bool = False, progress: bool = True) -> Path:
    """Re-denoise sampling over `spec` into the pair folder `out`: a folder of the same spec is
    resumed, one of another refused unless `overwrite` (its pairs are deleted first). Under
    accelerate, `process` = (index, count) writes this process's share of the shards and
    `wait_for_everyone` is the barrier that lets process 0 clear an overwritten folder first."""
    folder = OutputFolder(Path(out), RESULTS, overwrite=overwrite, resume=True).check()
    store = spec.store(out)
    if batch_size < 1:
        raise NoiseRefineError(f"batch size must be >= 1, got {batch_size}")
    shard_ids = store.process_shards(*process)
    if process[0] == 0:
        folder.open()
    wait_for_everyone()
    store.claim({"spec": asdict(spec), "base": backbone.fingerprint(), "latent_shape": list(backbone.latent_shape)},
                same_base=same_model)
    todo, total, flushed = store.pending(shard_ids)
    bar = tqdm(total=total, initial=flushed, disable=not progress, desc="golden pairs", unit="pair")
    improved = []

    def on_batch(batch: Batch) -> None:
        improved.append(batch["score_target"] > batch["score_source"])
        bar.update(len(batch["index"]))
        bar.set_postfix(improved=f"{torch.cat(improved).float().mean():.2f}")

    store.fill(todo, lambda idx: _pair_batch(backbone, spec, idx, scorer), batch_size, on_batch)
    bar.close()
    return store.folder


@torch.no_grad()
def _pair_batch(backbone: Backbone, spec: RedenoiseSpec, idx: list[int], scorer: Scorer) -> Batch:
    prompts, seeds = zip(*(spec.pair(i) for i in idx))
    x_T = noise_for_seeds(list(seeds), backbone.latent_shape).to(backbone.device, backbone.dtype)
    cond, uncond = backbone.encode_prompts(list(prompts)), backbone.encode_prompts([""] * len(idx))
    target = redenoise(backbone, x_T, cond, uncond, high_cfg=spec.high_cfg, low_cfg=spec.low_cfg,
                       grid_steps=spec.grid_steps)
    sampling = SamplingOptions(Guidance(spec.filter_cfg), spec.filter_steps)
    score = [sample_and_score(backbone, scorer, z, cond, uncond, prompts, sampling).cpu() for z in (x_T, target)]
    return {"source": x_T.cpu(), "target": target.cpu(), "score_source": score[0], "score_target": score[1]}


@dataclass
class PairSet:
    """The kept (source, target, prompt) noise pairs."""

    source: torch.Tensor
    target: torch.Tensor
    prompts: list[str]
    collected: int
    manifest: dict[str, Any]

    def __len__(self) -> int:
        return len(self.prompts)


def load_pairs(folder: Path, margin: float | None = 0.0) -> PairSet:
    """Finished shards of a pair folder, filtered: keep pairs with s_0 + margin < s_0' (margin None:
    keep every pair, unfiltered)."""
    manifest = read_manifest(folder, "pairs")
    spec = RedenoiseSpec(**manifest["spec"])
    data = spec.store(folder).load()
    if margin is None:
        keep = torch.arange(len(data["index"]))
    else:
        keep = (data["score_source"] + margin < data["score_target"]).nonzero().squeeze(1)
    if len(keep) == 0:
        raise NoiseRefineError(f"no pair in {folder} improves its score by the margin {margin}")
    return PairSet(data["source"][keep], data["target"][keep], [spec.pair(int(i))[0] for i in data["index"][keep]],
                   len(data["index"]), manifest)
