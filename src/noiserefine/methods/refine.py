"""NoiseRefine's noise-refining network g_phi (Ahn et al., "A Noise is Worth Diffusion Guidance",
section 3.3 and appendix D.1).

g_phi is a LoRA on the pretrained denoiser, evaluated ONCE at t = T on (x_T, c), with a residual
connection:  x_hat_T = x_T + s * delta_phi(x_T, c).

delta_phi is read off the denoiser's own output layer: while refining, that layer's output is
replaced by a zero-initialised layer of the same shape applied to the same features (the way
Noise Hypernetworks emit only a LoRA delta). So g_phi is exactly the identity at initialisation,
costs one denoiser evaluation per image, and the base weights are never modified: with the
adapter off the denoiser is the base model, bit for bit.

Optional guidance-scale conditioning (appendix A.4): a sinusoidal embedding of the teacher's
CFG scale, projected by a zero-initialised linear layer, is added to the timestep embedding.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.utils.checkpoint
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from noiserefine.backbones.base import Backbone, Cond, same_model
from noiserefine.errors import NoiseRefineError
from noiserefine.io import load_tensors, read_json, save_tensors, write_json
from noiserefine.sampling import check_noise

ADAPTER = "noiserefine"
FORMAT = "noiserefine-refiner/1"
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2",
                   "time_emb_proj", "ff.net.0.proj", "ff.net.2")
DEFAULT_RANK = 32  # the shipped refiner's LoRA rank; `train.TrainConfig` takes its default from here
# Guidance-scale conditioning (appendix A.4): the scale's sinusoidal features are as wide as the
# frequency features DiT's timestep embedder uses (256), and the scale is multiplied by 100 first so
# that scales ~1-10 fall in 100-1000, the range of timesteps these frequencies (1 to 1e-4) were laid
# out for; unscaled, all but the fastest few features would barely change between scales.
SCALE_FEATURES = 256
SCALE_MULTIPLIER = 100.0


@dataclass
class RefinerConfig:
    """Architecture of a refiner. `output_layer` names the denoiser's last layer (conv_out for
    diffusers UNets, proj_out_2 for DiT); `timestep` is T, the single input timestep."""

    rank: int = DEFAULT_RANK
    alpha: float | None = None  # LoRA alpha; None: the rank (LoRA scale alpha / rank = 1, as trained)
    target_modules: Sequence[str] = DEFAULT_TARGETS
    output_layer: str = "conv_out"
    timestep: int = 999
    scale_conditioning: bool = False
    time_embedding_layer: str = "time_embedding"
    teacher: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.alpha is None:
            self.alpha = float(self.rank)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d


class NoiseRefiner(nn.Module):
    """g_phi attached to a backbone. Call `refiner(x_T, cond, strength=1.0)` -> refined noise."""

    def __init__(self, backbone: Backbone, config: RefinerConfig | None = None) -> None:
        super().__init__()
        # A backbone may name its own output/time-embedding layers (DiT: proj_out_2, ...).
        config = config or RefinerConfig(**getattr(backbone, "refiner_defaults", {}))
        self.backbone = backbone
        self.config = config
        net = backbone.denoiser
        if any(isinstance(m, BaseTunerLayer) and ADAPTER in m.lora_A for m in net.modules()):
            raise NoiseRefineError("this backbone already carries a NoiseRefine adapter")
        lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=list(config.target_modules),
                          init_lora_weights=True)
        inject_adapter_in_model(lora, net, adapter_name=ADAPTER)
        self.lora_layers = [m for m in net.modules() if isinstance(m, BaseTunerLayer)]
        out_layer = net.get_submodule(config.output_layer)
        self.delta_head = copy.deepcopy(out_layer).requires_grad_(True)  # peft froze the original
        nn.init.zeros_(self.delta_head.weight)
        if self.delta_head.bias is not None:
            nn.init.zeros_(self.delta_head.bias)
        self.scale_proj: nn.Linear | None = None
        if config.scale_conditioning:
            temb_dim = _out_features(net.get_submodule(config.time_embedding_layer))
            self.scale_proj = nn.Linear(SCALE_FEATURES, temb_dim)
            nn.init.zeros_(self.scale_proj.weight)
            nn.init.zeros_(self.scale_proj.bias)
        self._hooks_on = False
        self._adapter_on = False
        self._scale: torch.Tensor | None = None
        out_layer.register_forward_hook(self._replace_output)
        if self.scale_proj is not None:
            net.get_submodule(config.time_embedding_layer).register_forward_hook(self._add_scale_embedding)
        self._set_adapter(False)
        self.to(device=backbone.device, dtype=backbone.dtype)

    # -- the refiner's own parameters ---------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        params = [p for n, p in self.backbone.denoiser.named_parameters() if "lora_" in n and ADAPTER in n]
        params += list(self.delta_head.parameters())
        if self.scale_proj is not None:
            params += list(self.scale_proj.parameters())
        return params

    def refiner_state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"lora.{k}": v for k, v in
                 get_peft_model_state_dict(self.backbone.denoiser, adapter_name=ADAPTER).items()}
        state |= {f"delta_head.{k}": v for k, v in self.delta_head.state_dict().items()}
        if self.scale_proj is not None:
            state |= {f"scale_proj.{k}": v for k, v in self.scale_proj.state_dict().items()}
        return state

    def load_refiner_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        lora = {k[5:]: v for k, v in state.items() if k.startswith("lora.")}
        result = set_peft_model_state_dict(self.backbone.denoiser, lora, adapter_name=ADAPTER)
        if getattr(result, "unexpected_keys", None):
            raise NoiseRefineError(f"refiner weights do not fit this model: {result.unexpected_keys[:3]}...")
        self.delta_head.load_state_dict({k[11:]: v for k, v in state.items() if k.startswith("delta_head.")})
        if self.scale_proj is not None:
            self.scale_proj.load_state_dict({k[11:]: v for k, v in state.items() if k.startswith("scale_proj.")})

    # -- forward -----------------------------------------------------------------------------
    def delta(self, x_T: torch.Tensor, cond: Cond, guidance_scale: float | torch.Tensor | None = None) -> torch.Tensor:
        """delta_phi(x_T, c): one denoiser evaluation at t = T with the adapter on."""
        check_noise(x_T, self.backbone.latent_shape)
        if self.scale_proj is not None:
            if guidance_scale is None:
                raise NoiseRefineError("this refiner is guidance-scale conditioned: pass guidance_scale")
            w = torch.as_tensor(guidance_scale, dtype=x_T.dtype, device=x_T.device).expand(x_T.shape[0])
            self._scale = self.scale_proj(sinusoidal_embedding(w, SCALE_FEATURES))
        t = torch.tensor(self.config.timestep, device=x_T.device)
        with self._refining():
            out = self.backbone.predict(x_T.to(self.backbone.dtype), t, cond)
        self._scale = None
        return out[:, : x_T.shape[1]].to(x_T.dtype)  # DiT with learned sigma emits 2C channels

    def forward(self, x_T: torch.Tensor, cond: Cond, strength: float = 1.0,
                guidance_scale: float | torch.Tensor | None = None) -> torch.Tensor:
        """Refined noise x_hat_T = x_T + s * delta_phi(x_T, c) (residual connection, section 3.3)."""
        return x_T + strength * self.delta(x_T, cond, guidance_scale)

    @contextmanager
    def _refining(self) -> Iterator[None]:
        self._set_adapter(True)
        self._hooks_on = True
        try:
            yield
        finally:
            self._hooks_on = False
            self._set_adapter(False)

    def _set_adapter(self, enabled: bool) -> None:
        # peft's enable_adapters(False) also sets requires_grad=False on the LoRA weights, which
        # would silently stop training; toggling the flag alone keeps them trainable.
        self._adapter_on = enabled
        for layer in self.lora_layers:
            layer._disable_adapters = not enabled

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the denoiser's blocks in the backward pass instead of storing activations.

        The adapter is switched on for the refiner's evaluation and off for the sampler's, and the
        backward pass runs after both, so a plain checkpoint would recompute every block with the
        adapter in whatever state it is left in. Each checkpoint here records the adapter state of
        its forward and restores it around its recomputation.
        """
        self.backbone.denoiser.enable_gradient_checkpointing(self._checkpoint)

    def _checkpoint(self, block: nn.Module, *args: Any) -> Any:
        state = self._adapter_on

        @contextmanager
        def as_in_forward() -> Iterator[None]:
            before = self._adapter_on
            self._set_adapter(state)
            try:
                yield
            finally:
                self._set_adapter(before)

        return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False,
                                                 context_fn=lambda: (nullcontext(), as_in_forward()))

    def _replace_output(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor):
        return self.delta_head(inputs[0]) if self._hooks_on else output

    def _add_scale_embedding(self, module: nn.Module, inputs, output: torch.Tensor):
        if self._hooks_on and self._scale is not None:
            return output + self._scale.to(output.dtype)
        return output

    # -- save / load -------------------------------------------------------------------------
    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """`path` (.safetensors) + a JSON config beside it naming the base model."""
        path = Path(path)
        save_tensors(path, self.refiner_state_dict())
        write_json(path.with_suffix(".json"), {
            "format": FORMAT, "base": self.backbone.fingerprint(), "config": self.config.to_json(), **(extra or {})})

    @classmethod
    def load(cls, backbone: Backbone, path: str | Path, force: bool = False) -> "NoiseRefiner":
        """Load a refiner for `backbone`. A refiner trained on another base model is refused unless
        `force=True` (transfer to fine-tuned bases is a feature, paper section 4.3)."""
        path = Path(path)
        meta = read_json(path.with_suffix(".json"))
        if meta.get("format") != FORMAT:
            raise NoiseRefineError(f"{path.with_suffix('.json')} is not a NoiseRefine refiner config")
        base = backbone.fingerprint()
        if not same_model(meta["base"], base) and not force:
            raise NoiseRefineError(
                f"refiner {path.name} was trained on {meta['base']}, this model is {base}; "
                "pass force=True (--force) to transfer it to a fine-tuned or related model")
        cfg = dict(meta["config"])
        refiner = cls(backbone, RefinerConfig(**cfg))
        refiner.load_refiner_state_dict(load_tensors(path))
        refiner.meta = meta
        return refiner


class RefinedNoise:
    """NoiseRefine as a noise method: x_hat_T = x_T + s * delta_phi(x_T, c), one denoiser evaluation."""

    name = "refined"
    extra_nfe = 1.0

    def __init__(self, refiner: NoiseRefiner, strength: float = 1.0, guidance_scale: float | None = None) -> None:
        if guidance_scale is not None and refiner.scale_proj is None:  # it would be silently ignored
            raise NoiseRefineError(f"this refiner is not guidance-scale conditioned: it takes no teacher scale, "
                                   f"got {guidance_scale}")
        self.refiner = refiner
        self.strength = strength
        self.guidance_scale = guidance_scale

    @torch.no_grad()
    def __call__(self, x_T: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        cond = self.refiner.backbone.encode_prompts(prompts)
        return self.refiner(x_T, cond, strength=self.strength, guidance_scale=self.guidance_scale)


def sinusoidal_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of a guidance scale per sample (as timestep embeddings, of
    SCALE_MULTIPLIER x the scale), (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=w.device, dtype=torch.float32) / half)
    args = w.float()[:, None] * SCALE_MULTIPLIER * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1).to(w.dtype)


def _out_features(module: nn.Module) -> int:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise NoiseRefineError("guidance-scale conditioning needs a linear timestep embedding")
    return linears[-1].out_features
