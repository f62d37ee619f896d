"""Golden Noise / NPNet (Zhou et al., "Golden Noise for Diffusion Models: A Learning Framework",
ICCV 2025): a small network maps Gaussian noise and the prompt to "golden" noise in one pass.

Stage I, re-denoise sampling (the data): x_T' = DDIM-Inversion_{w_w}(DDIM_{w_l}(x_T)), one DDIM
step at a high CFG scale w_l from x_T, then that step inverted at a low scale w_w < w_l; the scale
gap injects the prompt's semantics into the noise. A pair is kept when the image sampled from x_T'
beats the image sampled (the same way) from x_T by a margin m: s_0 + m < s_0'. The paper filters
with HPSv2; here the score is pluggable (shapes16: the primary judge's prompt probability).

Stage II, NPNet, trained with MSE(x_T', x'_pred) ("Training and Inference"):

    x'_pred = alpha * e + x~_T' + beta * x^_T
    x~_T' = U diag(Sigma~) V^T        singular-value prediction: keep the noise's singular vectors
                                      (Davis-Kahan: source and target share them), predict Sigma~
    e     = sigma(x_T, E(c))          text injection: adaptive group norm of x_T by the prompt
    x^_T  = phi'(psi(phi(x_T + e)))   residual prediction: down-sample, transformer, up-sample

alpha enters as 2 sigmoid(a) - 1 (the reference code's parametrisation); a and beta are learned.
The singular-value and residual heads start at zero and a = 0, so NPNet starts as the identity.

Stage III: `GoldenNoise` is an ordinary noise method, x_T -> NPNet(x_T, c), usable via `latents=`.

Deliberately unlike the public code: every sample is conditioned on its OWN prompt (the pooled
`backbone.encode_prompts`), one NPNet class serves training and inference, any latent size works
(SVD per channel, no 128 x 128 or 77-token sizes baked in), no device is assumed, and weights are
safetensors + a JSON config that names the base model they were fitted to.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from noiserefine.backbones.base import Backbone, Cond, same_model
from noiserefine.checkpoint import check_resume_config, load_checkpoint, save_checkpoint
from noiserefine.errors import NoiseRefineError
from noiserefine.guidance import Guidance, guided_prediction
from noiserefine.inversion import to_eps_x0
from noiserefine.io import ensure_out_dir, load_tensors, read_json, save_tensors, shipped_path, write_json
from noiserefine.methods.search import SearchSampling, sample_and_score
from noiserefine.sampling import check_noise, make_scheduler, noise_for_seeds
from noiserefine.scoring import Scorer

FORMAT = "noiserefine-npnet/1"
SHIPPED_WEIGHTS = "shapes16-npnet.safetensors"


# -- Stage I: re-denoise sampling and filtering -------------------------------------------------
@torch.no_grad()
def redenoise(backbone: Backbone, x_T: torch.Tensor, cond: Cond, uncond: Cond, *, high_cfg: float = 3.0,
              low_cfg: float = 1.0, grid_steps: int = 20) -> torch.Tensor:
    """x_T' = DDIM-Inversion_{low_cfg}(DDIM_{high_cfg}(x_T)) on the trailing DDIM grid of
    `grid_steps` steps: the step T -> t_1 at CFG `high_cfg`, then t_1 -> T inverted at `low_cfg`.

    The inversion queries the model at the point it starts from, (x_1, t_1), as plain DDIM
    inversion does (Song et al. 2020, Eq. 13 run backwards). `ddim_invert`
    queries it at the target timestep instead; at t = T of a zero-terminal-SNR v-prediction model
    (shapes16: alpha_bar_T ~ 2e-9) that turns the prediction into eps = x_1 whatever the model says,
    so the low scale would have no effect at all.
    """
    check_noise(x_T, backbone.latent_shape)
    if grid_steps < 2:
        raise NoiseRefineError(f"re-denoise sampling needs a grid of >= 2 steps, got {grid_steps}")
    sched = make_scheduler("ddim", backbone.scheduler_config)
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
    `filter_steps` DDIM steps to score it."""

    prompts: list[str]
    seeds: list[int]
    high_cfg: float = 3.0
    low_cfg: float = 1.0
    grid_steps: int = 20
    filter_cfg: float = 1.0
    filter_steps: int = 20
    shard_size: int = 256
    score: str = "judge"

    def pair(self, i: int) -> tuple[str, int]:
        return self.prompts[i % len(self.prompts)], self.seeds[i]

    @property
    def num_shards(self) -> int:
        return -(-len(self.seeds) // self.shard_size)

    def shard_range(self, k: int) -> range:
        return range(k * self.shard_size, min((k + 1) * self.shard_size, len(self.seeds)))


def collect_pairs(backbone: Backbone, spec: RedenoiseSpec, out: Path, scorer: Scorer, batch_size: int = 64,
                  progress: bool = True) -> Path:
    """Re-denoise sampling over `spec`, in resumable safetensors shards (a killed run keeps its
    finished shards) plus `manifest.json`. Every pair stores both scores; filtering is at loading."""
    if spec.high_cfg <= spec.low_cfg:
        raise NoiseRefineError(f"re-denoise sampling needs high_cfg > low_cfg, got {spec.high_cfg} and {spec.low_cfg}")
    out = ensure_out_dir(out)
    _check_or_write_manifest(out, spec, backbone)
    todo = [k for k in range(spec.num_shards) if not _shard_path(out, k).is_file()]
    bar = tqdm(total=sum(len(spec.shard_range(k)) for k in todo), disable=not progress, desc="golden pairs", unit="pair")
    for k in todo:
        parts = []
        idx = list(spec.shard_range(k))
        for lo in range(0, len(idx), batch_size):
            parts.append(_pair_batch(backbone, spec, idx[lo: lo + batch_size], scorer))
            bar.update(len(parts[-1]["index"]))
            bar.set_postfix(kept_at_m0=f"{_improved_fraction(parts):.2f}")
        save_tensors(_shard_path(out, k), {name: torch.cat([p[name] for p in parts]) for name in parts[0]})
    bar.close()
    return out


@torch.no_grad()
def _pair_batch(backbone: Backbone, spec: RedenoiseSpec, idx: list[int], scorer: Scorer) -> dict[str, torch.Tensor]:
    prompts, seeds = zip(*(spec.pair(i) for i in idx))
    x_T = noise_for_seeds(list(seeds), backbone.latent_shape).to(backbone.device, backbone.dtype)
    cond, uncond = backbone.encode_prompts(list(prompts)), backbone.encode_prompts([""] * len(idx))
    target = redenoise(backbone, x_T, cond, uncond, high_cfg=spec.high_cfg, low_cfg=spec.low_cfg,
                       grid_steps=spec.grid_steps)
    sampling = SearchSampling(Guidance(spec.filter_cfg), spec.filter_steps)
    score = [sample_and_score(backbone, scorer, z, cond, uncond, prompts, sampling).cpu() for z in (x_T, target)]
    return {"index": torch.tensor(idx), "source": x_T.cpu(), "target": target.cpu(),
            "score_source": score[0], "score_target": score[1]}


def _improved_fraction(parts: list[dict[str, torch.Tensor]]) -> float:
    return float(torch.cat([(p["score_target"] > p["score_source"]).float() for p in parts]).mean())


def _shard_path(out: Path, k: int) -> Path:
    return out / f"pairs-{k:05d}.safetensors"


def _check_or_write_manifest(out: Path, spec: RedenoiseSpec, backbone: Backbone) -> None:
    record = {"spec": asdict(spec), "base": backbone.fingerprint(), "latent_shape": list(backbone.latent_shape)}
    path = out / "manifest.json"
    if path.is_file():
        found = read_json(path)
        if {**found, "base": None} != {**record, "base": None} or not same_model(found["base"], record["base"]):
            raise NoiseRefineError(f"{out} holds pairs of another spec or base model; use a new folder")
        return
    write_json(path, record)


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


def load_pairs(folder: Path, margin: float = 0.0) -> PairSet:
    """Finished shards of a pair folder, filtered: keep pairs with s_0 + margin < s_0'."""
    folder = Path(folder)
    manifest = read_json(folder / "manifest.json")
    spec = RedenoiseSpec(**manifest["spec"])
    shards = [load_tensors(_shard_path(folder, k)) for k in range(spec.num_shards) if _shard_path(folder, k).is_file()]
    if not shards:
        raise NoiseRefineError(f"{folder} has no finished pair shards yet")
    data = {name: torch.cat([s[name] for s in shards]) for name in shards[0]}
    keep = (data["score_source"] + margin < data["score_target"]).nonzero().squeeze(1)
    if len(keep) == 0:
        raise NoiseRefineError(f"no pair in {folder} improves its score by the margin {margin}")
    return PairSet(data["source"][keep], data["target"][keep], [spec.pair(int(i))[0] for i in data["index"][keep]],
                   len(data["index"]), manifest)


# -- Stage II: the network ----------------------------------------------------------------------
@dataclass
class NPNetConfig:
    """NPNet's architecture. `channels` and `text_dim` come from the backbone; the spatial size is
    free (it must divide by `patch`)."""

    channels: int
    text_dim: int
    width: int = 64
    depth: int = 2
    heads: int = 4
    patch: int = 2

    def __post_init__(self) -> None:
        if self.width % 4 or self.width % self.heads:
            raise NoiseRefineError(f"NPNet width {self.width} must divide by 4 and by heads={self.heads}")


def pooled_prompt_embedding(cond: Cond) -> torch.Tensor:
    """E(c) for the text injection: the prompt's token embeddings averaged over tokens, (B, D)."""
    if "encoder_hidden_states" not in cond:
        raise NoiseRefineError(f"NPNet needs prompt embeddings (encoder_hidden_states); got {sorted(cond)}")
    return cond["encoder_hidden_states"].float().mean(1)


class TextInjection(nn.Module):
    """e = sigma(x_T, E(c)): group norm of x_T, then a per-channel scale and shift from the prompt
    (diffusers' AdaGroupNorm, as the reference pipeline)."""

    def __init__(self, channels: int, text_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(text_dim, 2 * channels)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        return F.group_norm(x, 1) * (1 + scale) + shift


class SingularValuePredictor(nn.Module):
    """x~_T' = U diag(Sigma + delta) V^T, per channel. Each singular triple is one token described
    by size-free features (its value, relative rank, and the DC content of its singular vectors, in
    sign-invariant form); a transformer layer over the tokens predicts delta (zero at init)."""

    FEATURES = 5

    def __init__(self, channels: int, width: int, heads: int) -> None:
        super().__init__()
        self.embed = nn.Linear(self.FEATURES, width)
        self.channel = nn.Embedding(channels, width)
        self.mix = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, activation="gelu",
                                              batch_first=True, norm_first=True)
        self.head = nn.Linear(width, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # the singular vectors are kept, not learned: no gradient through the SVD
            u, s, vh = torch.linalg.svd(x, full_matrices=False)
        b, c, k = s.shape
        tokens = self.embed(_singular_features(u, s, vh)) + self.channel.weight[:, None, :]
        delta = self.head(self.mix(tokens.reshape(b, c * k, -1))).reshape(b, c, k)
        return u @ torch.diag_embed(s + delta) @ vh


def _singular_features(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
    """(B, C, K, 5) features that do not depend on the matrix size or on the SVD's sign choice."""
    h, w = u.shape[-2], vh.shape[-1]
    k = s.shape[-1]
    dc_u = u.sum(-2) / math.sqrt(h)  # projection of each left singular vector on the constant vector
    dc_v = vh.sum(-1) / math.sqrt(w)
    rank = torch.linspace(0, 1, k, device=s.device).expand_as(s)
    value = s / (math.sqrt(h) + math.sqrt(w))  # the largest singular value of Gaussian noise is ~1
    return torch.stack([value, rank, dc_u * dc_v, dc_u.abs(), dc_v.abs()], dim=-1)


class ResidualPredictor(nn.Module):
    """x^_T = phi'(psi(phi(x_T + e))): patch down-sampling (phi), a transformer over the patches
    with the prompt embedding added to every token (psi), transposed-conv up-sampling (phi',
    zero at init). Position embeddings are 2-D sinusoids, so any size divisible by `patch` works."""

    def __init__(self, cfg: NPNetConfig) -> None:
        super().__init__()
        self.down = nn.Conv2d(cfg.channels, cfg.width, cfg.patch, stride=cfg.patch)
        self.text = nn.Linear(cfg.text_dim, cfg.width)
        layer = nn.TransformerEncoderLayer(cfg.width, cfg.heads, 2 * cfg.width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.width)
        self.up = nn.ConvTranspose2d(cfg.width, cfg.channels, cfg.patch, stride=cfg.patch)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.down(x)
        b, d, rows, cols = h.shape
        tokens = h.flatten(2).transpose(1, 2) + _positions_2d(rows, cols, d, h.device) + self.text(emb)[:, None]
        tokens = self.norm(self.blocks(tokens))
        return self.up(tokens.transpose(1, 2).reshape(b, d, rows, cols))


def _positions_2d(rows: int, cols: int, dim: int, device: torch.device) -> torch.Tensor:
    """(rows * cols, dim) sinusoidal embeddings of (row, column), dim/2 features each."""
    quarter = dim // 4
    freqs = torch.exp(-math.log(10000.0) * torch.arange(quarter, device=device) / quarter)
    r, c = torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols, device=device), indexing="ij")
    angles = [coord.flatten()[:, None].float() * freqs for coord in (r, c)]
    return torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)


class NPNet(nn.Module):
    """The noise prompt network: `npnet(x_T, emb)` -> golden noise, emb = pooled prompt embedding."""

    def __init__(self, config: NPNetConfig) -> None:
        super().__init__()
        self.config = config
        self.inject = TextInjection(config.channels, config.text_dim)
        self.singular = SingularValuePredictor(config.channels, config.width, config.heads)
        self.residual = ResidualPredictor(config)
        self.alpha = nn.Parameter(torch.zeros(()))  # through 2 sigmoid(a) - 1: no injection at init
        self.beta = nn.Parameter(torch.ones(()))

    def forward(self, x_T: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x'_pred = alpha e + x~_T' + beta x^_T for x_T (B, C, H, W) and emb (B, text_dim)."""
        self._check(x_T, emb)
        x, emb = x_T.float(), emb.float()
        e = self.inject(x, emb)
        out = self.singular(x) + (2 * torch.sigmoid(self.alpha) - 1) * e + self.beta * self.residual(x + e, emb)
        return out.to(x_T.dtype)

    def _check(self, x_T: torch.Tensor, emb: torch.Tensor) -> None:
        c, p = self.config.channels, self.config.patch
        if x_T.ndim != 4 or x_T.shape[1] != c or x_T.shape[2] % p or x_T.shape[3] % p:
            raise NoiseRefineError(f"NPNet takes noise (B, {c}, H, W) with H and W divisible by {p}, "
                                   f"got {tuple(x_T.shape)}")
        if emb.shape != (x_T.shape[0], self.config.text_dim):
            raise NoiseRefineError(f"NPNet needs one prompt embedding (B, {self.config.text_dim}) per noise, "
                                   f"got {tuple(emb.shape)} for {x_T.shape[0]} noises")

    @classmethod
    def for_backbone(cls, backbone: Backbone, **arch: int) -> "NPNet":
        """A fresh (identity) NPNet sized for `backbone`'s latents and prompt embeddings."""
        with torch.no_grad():
            text_dim = pooled_prompt_embedding(backbone.encode_prompts([""])).shape[1]
        net = cls(NPNetConfig(channels=backbone.latent_shape[0], text_dim=text_dim, **arch))
        return net.to(backbone.device)

    def save(self, path: str | Path, base: dict[str, str], extra: dict[str, Any] | None = None) -> None:
        """`path` (.safetensors) + a JSON config beside it naming the base model fingerprint."""
        path = Path(path)
        save_tensors(path, self.state_dict())
        write_json(path.with_suffix(".json"), {"format": FORMAT, "base": base, "config": asdict(self.config),
                                               **(extra or {})})

    @classmethod
    def load(cls, backbone: Backbone, path: str | Path | None = None, force: bool = False) -> "NPNet":
        """Load an NPNet for `backbone` (the shipped shapes16 one when `path` is None). One fitted to
        another base model is refused unless `force=True`."""
        path = Path(path) if path else shipped_path(SHIPPED_WEIGHTS)
        meta = read_json(path.with_suffix(".json"))
        if meta.get("format") != FORMAT:
            raise NoiseRefineError(f"{path.with_suffix('.json')} is not an NPNet config")
        if not same_model(meta["base"], backbone.fingerprint()) and not force:
            raise NoiseRefineError(f"NPNet {path.name} was trained on {meta['base']}, this model is "
                                   f"{backbone.fingerprint()}; pass force=True (--force) to use it anyway")
        net = cls(NPNetConfig(**meta["config"]))
        try:
            net.load_state_dict(load_tensors(path))
        except RuntimeError as err:
            raise NoiseRefineError(f"{path} does not fit its NPNet config ({str(err).splitlines()[0]})") from None
        net.meta = meta
        return net.to(backbone.device).eval()


# -- Stage II: training -------------------------------------------------------------------------
@dataclass
class NPNetTrainConfig:
    """MSE training on the kept pairs: AdamW, cosine learning-rate decay, batches drawn by
    generators seeded with (seed, step) so a resumed run equals an uninterrupted one."""

    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    margin: float = 0.0
    val_fraction: float = 0.05
    width: int = 64
    depth: int = 2
    heads: int = 4
    patch: int = 2
    seed: int = 0
    checkpoint_every: int = 200


def train_npnet(backbone: Backbone, pairs: Path, out: Path, cfg: NPNetTrainConfig = NPNetTrainConfig(),
                progress: bool = True) -> Path:
    """Train (or resume) NPNet on a pair folder. Writes `out/npnet.safetensors` + JSON; atomic
    checkpoints under `out/checkpoint` every `checkpoint_every` steps."""
    data = load_pairs(pairs, cfg.margin)
    if not same_model(data.manifest["base"], backbone.fingerprint()):
        raise NoiseRefineError(f"pairs were collected with {data.manifest['base']}, the model here is {backbone.fingerprint()}")
    emb = _prompt_table(backbone, data.prompts)
    train_idx, val_idx = _split(len(data), cfg.val_fraction)
    torch.manual_seed(cfg.seed)
    net = NPNet.for_backbone(backbone, width=cfg.width, depth=cfg.depth, heads=cfg.heads, patch=cfg.patch)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.0)
    out = ensure_out_dir(out)
    start, losses = _resume(out, net, opt, cfg)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train npnet", disable=not progress)
    t0 = time.time()
    for step in bar:
        losses.append(_train_step(net, opt, data, emb, train_idx, cfg, step))
        bar.set_postfix(mse=f"{np.mean(losses[-50:]):.5f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            save_checkpoint(out / "checkpoint", step + 1, {"npnet": net}, opt,
                            {"losses": losses, "config": _comparable(cfg)})
    path = out / "npnet.safetensors"
    net.save(path, backbone.fingerprint(), {
        "training": asdict(cfg), "pairs": str(pairs), "redenoise": _redenoise_summary(data.manifest["spec"]),
        "pairs_collected": data.collected, "pairs_kept": len(data), "final_mse_avg50": float(np.mean(losses[-50:])),
        **_validation(net, data, emb, val_idx), "train_seconds_this_run": round(time.time() - t0, 1)})
    return path


def _resume(out: Path, net: NPNet, opt: torch.optim.Optimizer, cfg: NPNetTrainConfig) -> tuple[int, list[float]]:
    """(step, losses) of the checkpoint in `out`, restored into net and opt; (0, []) if none.
    The configuration is compared first: another architecture's weights would not even load."""
    check_resume_config(out / "checkpoint", _comparable(cfg))
    meta = load_checkpoint(out / "checkpoint", {"npnet": net}, opt)
    return (meta["step"], meta["losses"]) if meta else (0, [])


def _train_step(net: NPNet, opt: torch.optim.Optimizer, data: PairSet, emb: torch.Tensor, train_idx: np.ndarray,
                cfg: NPNetTrainConfig, step: int) -> float:
    for group in opt.param_groups:  # cosine decay, a function of the step alone (resumable)
        group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
    rng = np.random.default_rng([cfg.seed, step])
    idx = torch.from_numpy(train_idx[rng.choice(len(train_idx), size=cfg.batch_size, replace=len(train_idx) < cfg.batch_size)])
    dev = emb.device
    loss = F.mse_loss(net(data.source[idx].to(dev), emb[idx]), data.target[idx].to(dev).float())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


@torch.no_grad()
def _prompt_table(backbone: Backbone, prompts: list[str]) -> torch.Tensor:
    """(N, D) pooled embedding of each pair's own prompt (each distinct prompt encoded once)."""
    unique = sorted(set(prompts))
    table = pooled_prompt_embedding(backbone.encode_prompts(unique))
    return table[torch.tensor([unique.index(p) for p in prompts], device=table.device)]


def _split(n: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """A fixed validation split (every k-th pair), so resumed runs see the same one."""
    if not 0 <= val_fraction < 1:
        raise NoiseRefineError(f"val_fraction must be in [0, 1), got {val_fraction}")
    every = round(1 / val_fraction) if val_fraction else n + 1
    val = np.arange(every - 1, n, every)
    return np.setdiff1d(np.arange(n), val), val


@torch.no_grad()
def _validation(net: NPNet, data: PairSet, emb: torch.Tensor, val_idx: np.ndarray) -> dict[str, float]:
    """Held-out MSE of NPNet and of the identity (predicting x_T' = x_T)."""
    if len(val_idx) == 0:
        return {}
    idx = torch.from_numpy(val_idx)
    src, tgt = data.source[idx].to(emb.device), data.target[idx].to(emb.device).float()
    return {"val_mse": float(F.mse_loss(net(src, emb[idx]), tgt)), "val_mse_identity": float(F.mse_loss(src.float(), tgt)),
            "val_pairs": len(val_idx)}


def _redenoise_summary(spec: dict[str, Any]) -> dict[str, Any]:
    """The pair spec without its (long) prompt and seed lists."""
    return {k: v for k, v in spec.items() if k not in ("prompts", "seeds")} | {
        "num_prompts": len(spec["prompts"]), "num_seeds": len(spec["seeds"])}


def _comparable(cfg: NPNetTrainConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d.pop("checkpoint_every")
    return d


# -- Stage III: inference -----------------------------------------------------------------------
class GoldenNoise:
    """NPNet as a noise method: `GoldenNoise(npnet, backbone)(x_T, prompts)` -> golden noise.
    No denoiser evaluation: one prompt encoding and one small network pass per batch."""

    name = "golden"
    extra_nfe = 0.0

    def __init__(self, npnet: NPNet, backbone: Backbone) -> None:
        self.npnet = npnet.eval()
        self.backbone = backbone

    @torch.no_grad()
    def __call__(self, x_T: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_noise(x_T, self.backbone.latent_shape)
        if len(prompts) != len(x_T):
            raise NoiseRefineError(f"got {len(x_T)} noises but {len(prompts)} prompts")
        return self.npnet(x_T, pooled_prompt_embedding(self.backbone.encode_prompts(list(prompts))))
