"""NoiseRefine's noise-refining network g_phi (Ahn et al., "A Noise is Worth Diffusion Guidance",
section 3.3 and appendix D.1).

g_phi is a LoRA on the pretrained denoiser, evaluated ONCE at t = T on (x_T, c), with a residual
connection:  x_hat_T = x_T + s * delta_phi(x_T, c).

delta_phi is read off the denoiser's own output layer: while refining, that layer's output is
replaced by a zero-initialised layer of the same shape applied to the same features (the way
Noise Hypernetworks emit only a LoRA delta). So g_phi is exactly the identity at initialisation,
costs one denoiser evaluation per image, and the base weights are never modified: with the
adapter inactive the denoiser is the base model, bit for bit.

The refiner's adapter is active only during that one evaluation (peft's per-layer active-adapter
lists, switched and restored), so it coexists with the user's own LoRAs (e.g. a style LoRA loaded
through diffusers' `load_lora_weights`, before or after attaching): those keep working in every
sampling step and are off while the refiner evaluates, unless `keep_user_loras` is set.
Saved refiners are standard PEFT adapter folders (`save_pretrained`, `methods/refiner_folder.py`).

Optional guidance-scale conditioning (appendix A.4): a sinusoidal embedding of the teacher's
CFG scale, projected by a zero-initialised linear layer, is added to the timestep embedding.
"""

from __future__ import annotations

import copy
import math
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.utils.checkpoint
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from noiserefine.backbones.base import Backbone, Cond, same_model
from noiserefine.errors import NoiseRefineError
from noiserefine.io import load_tensors, read_json, save_tensors, write_json
from noiserefine.methods.refiner_folder import FOLDER_FORMAT, hub_id, model_card, read_folder, write_folder
from noiserefine.sampling import check_noise

ADAPTER = "noiserefine"
FORMAT = "noiserefine-refiner/1"  # the old single-file format (`save`); folders: refiner_folder.FOLDER_FORMAT
PEFT_FIELDS = ("rank", "alpha", "target_modules", "output_layer")  # a folder keeps them in adapter_config.json
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
        users = adapter_state(net)  # the user's own LoRAs, if any (e.g. diffusers' load_lora_weights)
        if any(_carries_refiner(layer) for layer, _, _ in users):
            raise NoiseRefineError("this backbone already carries a NoiseRefine adapter")
        self.keep_user_loras = False  # True: the user's LoRAs stay on during the evaluation at t = T
        lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=list(config.target_modules),
                          init_lora_weights=True)
        with warnings.catch_warnings():  # "Already found a `peft_config`" (the user's LoRAs): intended
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            inject_adapter_in_model(lora, net, adapter_name=ADAPTER)  # peft activates it on every LoRA layer
        _restore_user_state(users, net)
        self._own_layers = [layer for layer, _, _ in adapter_state(net) if _carries_refiner(layer)]
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
        self._scale: torch.Tensor | None = None
        net.register_forward_pre_hook(self._keep_adapter_inactive)
        out_layer.register_forward_hook(self._replace_output)
        if self.scale_proj is not None:
            net.get_submodule(config.time_embedding_layer).register_forward_hook(self._add_scale_embedding)
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
        missing = sorted(get_peft_model_state_dict(self.backbone.denoiser, adapter_name=ADAPTER).keys() - lora.keys())
        if missing:
            raise NoiseRefineError(f"refiner weights lack {len(missing)} LoRA weights of this model: {missing[:3]}...")
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

    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        """The refiner's conditioning c: the backbone's encoding, with the user's LoRAs on its text
        encoders off as in the evaluation at t = T (unless `keep_user_loras`)."""
        encoders = [m for m in vars(self.backbone).values()
                    if isinstance(m, nn.Module) and m is not self.backbone.denoiser]
        with self._switched([state for m in encoders for state in adapter_state(m)]):
            return self.backbone.encode_prompts(prompts)

    @contextmanager
    def _refining(self) -> Iterator[None]:
        with self._switched(adapter_state(self.backbone.denoiser)):
            self._hooks_on = True
            try:
                yield
            finally:
                self._hooks_on = False

    @contextmanager
    def _switched(self, outside: list[LayerState]) -> Iterator[None]:
        """Within: the refiner's adapter active where it has one, the user's adapters as they were
        under `keep_user_loras`, else off. After: every layer as it was (`outside`)."""
        inside = []
        for layer, active, disabled in outside:
            user = tuple(a for a in active if a != ADAPTER) if self.keep_user_loras and not disabled else ()
            on = user + ((ADAPTER,) if _carries_refiner(layer) else ())
            inside.append((layer, on or active, not on))
        set_adapter_state(inside)
        try:
            yield
        finally:
            set_adapter_state(outside)

    def _keep_adapter_inactive(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """Forward pre-hook of the denoiser: outside the refiner's evaluation its adapter is never
        active, whoever activated it (peft activates a remaining adapter when the user deletes the
        active one; `set_adapters` may name it)."""
        if not self._hooks_on:
            set_adapter_state([(layer, tuple(a for a in layer.active_adapters if a != ADAPTER), layer.disable_adapters)
                               for layer in self._own_layers if ADAPTER in layer.active_adapters])

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the denoiser's blocks in the backward pass instead of storing activations.

        The adapter is switched on for the refiner's evaluation and off for the sampler's, and the
        backward pass runs after both, so a plain checkpoint would recompute every block with the
        adapter in whatever state it is left in. Each checkpoint here records the adapter state of
        its block's layers in its forward and restores it around its recomputation.
        """
        self.backbone.denoiser.enable_gradient_checkpointing(self._checkpoint)

    def _checkpoint(self, block: nn.Module, *args: Any) -> Any:
        state = adapter_state(block)

        @contextmanager
        def as_in_forward() -> Iterator[None]:
            now = adapter_state(block)
            set_adapter_state(state)
            try:
                yield
            finally:
                set_adapter_state(now)

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
        """The single-file format: `path` (.safetensors, keys `lora.*`, `delta_head.*`, `scale_proj.*`)
        + a JSON config beside it naming the base model. No standard tool opens it; `save_pretrained`
        writes the standard folder."""
        path = Path(path)
        save_tensors(path, self.refiner_state_dict())
        write_json(path.with_suffix(".json"), {
            "format": FORMAT, "base": self.backbone.fingerprint(), "config": self.config.to_json(), **(extra or {})})

    def save_pretrained(self, folder: str | Path, extra: dict[str, Any] | None = None,
                        base_model: str | None = None) -> Path:
        """Write a standard PEFT adapter folder (LoRA + the delta head as the output layer's
        `modules_to_save`), `noiserefine.json` (format, base model, timestep, teacher, scale
        conditioning, `extra`), the scale projection's weights if any, and a model card
        (`methods/refiner_folder.py`). `base_model`: the card's Hub id; default: the one the
        denoiser was loaded from, if it came from the Hub. Returns the folder."""
        base_model = base_model or hub_id(getattr(self.backbone.denoiser, "config", {}).get("_name_or_path"))
        c = self.config
        lora = LoraConfig(r=c.rank, lora_alpha=c.alpha, target_modules=list(c.target_modules),
                          modules_to_save=[c.output_layer], base_model_name_or_path=base_model)
        meta = {"format": FOLDER_FORMAT, "base": self.backbone.fingerprint(),
                "config": {k: v for k, v in c.to_json().items() if k not in PEFT_FIELDS}, **(extra or {})}
        return write_folder(Path(folder), self.refiner_state_dict(), lora, meta, model_card(meta, base_model))

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, backbone: Backbone, *, force: bool = False,
                        revision: str | None = None) -> "NoiseRefiner":
        """Attach a refiner folder (`save_pretrained`) to `backbone`: a local folder, or else a
        Hugging Face Hub id (downloaded through huggingface_hub, at `revision`). A refiner trained
        on another base model is refused unless `force=True` (paper section 4.3)."""
        state, lora, meta = read_folder(path_or_id, revision)
        config = RefinerConfig(rank=lora.r, alpha=float(lora.lora_alpha), target_modules=sorted(lora.target_modules),
                               output_layer=lora.modules_to_save[0], **meta["config"])
        return cls._attach_saved(backbone, config, state, {**meta, "config": config.to_json()}, str(path_or_id), force)

    @classmethod
    def load(cls, backbone: Backbone, path: str | Path, force: bool = False) -> "NoiseRefiner":
        """Load a refiner for `backbone`: a folder or Hub id (`from_pretrained`), or an old single
        `.safetensors` file with its `.json` beside it (`save`). A refiner trained on another base
        model is refused unless `force=True` (transfer to fine-tuned bases is a feature, paper section 4.3)."""
        path = Path(path)
        if path.suffix != ".safetensors":
            return cls.from_pretrained(path, backbone, force=force)
        if not path.is_file():
            raise NoiseRefineError(f"refiner file not found: {path}")
        meta = read_json(path.with_suffix(".json"))
        if meta.get("format") != FORMAT:
            raise NoiseRefineError(f"{path.with_suffix('.json')} is not a NoiseRefine refiner config")
        return cls._attach_saved(backbone, RefinerConfig(**meta["config"]), load_tensors(path), meta, path.name, force)

    @classmethod
    def _attach_saved(cls, backbone: Backbone, config: RefinerConfig, state: dict[str, torch.Tensor],
                      meta: dict[str, Any], name: str, force: bool) -> "NoiseRefiner":
        base = backbone.fingerprint()
        if not same_model(meta["base"], base) and not force:
            raise NoiseRefineError(
                f"refiner {name} was trained on {meta['base']}, this model is {base}; "
                "pass force=True (--force) to transfer it to a fine-tuned or related model")
        refiner = cls(backbone, config)
        refiner.load_refiner_state_dict(state)
        refiner.meta = meta
        return refiner

    def load_weights_from(self, path: str | Path) -> None:
        """Load a saved refiner's weights (folder, Hub id or old single file) into this one, which
        must have the same rank and layers (e.g. to fine-tune it further)."""
        path = Path(path)
        self.load_refiner_state_dict(load_tensors(path) if path.suffix == ".safetensors" else read_folder(path)[0])


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
        cond = self.refiner.encode_prompts(prompts)
        return self.refiner(x_T, cond, strength=self.strength, guidance_scale=self.guidance_scale)


LayerState = tuple[BaseTunerLayer, tuple[str, ...], bool]
"""A peft adapter layer, its active adapters and whether its adapters are disabled."""


def adapter_state(module: nn.Module) -> list[LayerState]:
    """The adapter state of every peft adapter layer in `module`."""
    return [(m, tuple(m.active_adapters), m.disable_adapters) for m in module.modules() if isinstance(m, BaseTunerLayer)]


def set_adapter_state(state: Iterable[LayerState]) -> None:
    """Give each layer its active adapters and disabled flag through peft's public layer API
    (`set_adapter`, `enable_adapters`). Those also set requires_grad (True for the active adapters'
    weights, False for the others); here every weight keeps its own, so the refiner's LoRA stays
    trainable while inactive, and the user's LoRA stays as the user left it."""
    for layer, active, disabled in state:
        if (tuple(layer.active_adapters), layer.disable_adapters) == (active, disabled):
            continue
        grads = [(p, p.requires_grad) for p in layer.parameters()]
        layer.set_adapter(list(active))
        layer.enable_adapters(not disabled)
        for p, requires_grad in grads:
            p.requires_grad_(requires_grad)


def _carries_refiner(layer: BaseTunerLayer) -> bool:
    return any(ADAPTER in getattr(layer, name) for name in layer.adapter_layer_names)


def _restore_user_state(users: list[LayerState], net: nn.Module) -> None:
    """After injecting the refiner's adapter (which peft activates on every LoRA layer): the user's
    layers as they were (`users`), the layers new to the refiner as the user's first layer (the
    selection diffusers' `set_adapters` makes is model-wide), or with nothing active."""
    known = {id(layer): (active, disabled) for layer, active, disabled in users}
    default = users[0][1:] if users else ((), False)
    set_adapter_state([(layer, *known.get(id(layer), default)) for layer, _, _ in adapter_state(net)])


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
