"""Golden Noise / NPNet (Zhou et al., "Golden Noise for Diffusion Models: A Learning Framework",
ICCV 2025): a small network maps Gaussian noise and the prompt to "golden" noise in one pass.
This module holds the network and the noise method (Stage III); its data (Stage I, re-denoise
sampling) is `noiserefine.npnet_pairs` and its training (Stage II) `noiserefine.train_npnet`.

NPNet ("Training and Inference"):

    x'_pred = alpha * e + x~_T' + beta * x^_T
    x~_T' = U diag(Sigma~) V^T        singular-value prediction: keep the noise's singular vectors
                                      (Davis-Kahan: source and target share them), predict Sigma~
    e     = sigma(x_T, E(c))          text injection: adaptive group norm of x_T by the prompt
    x^_T  = phi'(psi(phi(x_T + e)))   residual prediction: down-sample, transformer, up-sample

alpha enters as 2 sigmoid(a) - 1 (the reference code's parametrisation); a and beta are learned.
The singular-value and residual heads start at zero and a = 0, so NPNet starts as the identity.
The paper's ablations switch a branch off (`NPNetConfig.singular_values` / `residual`): without
singular-value prediction x~_T' is x_T itself (the singular values are kept), without residual
prediction the beta x^_T term and its network are gone.

Stage III: `GoldenNoise` is an ordinary noise method, x_T -> NPNet(x_T, c), usable via `latents=`.

Deliberately unlike the public code: every sample is conditioned on its OWN prompt (the pooled
`backbone.encode_prompts`), one NPNet class serves training and inference, any latent size works
(SVD per channel, no 128 x 128 or 77-token sizes baked in), no device is assumed, and weights are
safetensors + a JSON config that names the base model they were fitted to.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from noiserefine.backbones.base import Backbone, Cond, same_model
from noiserefine.errors import NoiseRefineError
from noiserefine.io import load_tensors, read_json, save_tensors, write_json
from noiserefine.sampling import check_noise

FORMAT = "noiserefine-npnet/1"


@dataclass
class NPNetConfig:
    """NPNet's architecture. `channels` and `text_dim` come from the backbone; the spatial size is
    free (it must divide by `patch`). `singular_values` / `residual` False drop that branch (the
    paper's ablations "w/o singular value prediction" / "w/o residual prediction")."""

    channels: int
    text_dim: int
    width: int = 64
    depth: int = 2
    heads: int = 4
    patch: int = 2
    singular_values: bool = True
    residual: bool = True

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
        if config.singular_values:
            self.singular = SingularValuePredictor(config.channels, config.width, config.heads)
        if config.residual:
            self.residual = ResidualPredictor(config)
            self.beta = nn.Parameter(torch.ones(()))
        self.alpha = nn.Parameter(torch.zeros(()))  # through 2 sigmoid(a) - 1: no injection at init

    def forward(self, x_T: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x'_pred = alpha e + x~_T' + beta x^_T for x_T (B, C, H, W) and emb (B, text_dim)."""
        self._check(x_T, emb)
        x, emb = x_T.float(), emb.float()
        e = self.inject(x, emb)
        out = (self.singular(x) if self.config.singular_values else x) + (2 * torch.sigmoid(self.alpha) - 1) * e
        if self.config.residual:
            out = out + self.beta * self.residual(x + e, emb)
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
    def for_backbone(cls, backbone: Backbone, **arch: int | bool) -> "NPNet":
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
    def load(cls, backbone: Backbone, path: str | Path, force: bool = False) -> "NPNet":
        """Load the NPNet at `path` for `backbone` (the shipped shapes16 one: `backbone.shipped_weights`).
        One fitted to another base model is refused unless `force=True`."""
        path = Path(path)
        if not path.is_file():
            raise NoiseRefineError(f"NPNet not found: {path}")
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
