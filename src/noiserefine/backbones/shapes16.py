"""The embedded shapes16 backbone: a small diffusers UNet2DConditionModel in pixel space with a
learned 3-token prompt embedding (docs/world.md describes the world and this model). Decoding is
the identity."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from noiserefine.backbones.pag import install_pag_processors
from noiserefine.backbones.base import Cond, DenoiserBackboneMixin, attach_guide, batch_timesteps
from noiserefine.errors import NoiseRefineError
from noiserefine.io import load_tensors, read_json, save_tensors, shipped_path, write_json
from noiserefine.world.shapes16 import COLORS, IMAGE_SIZE, POSITIONS, SHAPES, parse_prompt

UNET_CONFIG: dict[str, Any] = {
    "sample_size": IMAGE_SIZE,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 64,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "v_prediction",
    "timestep_spacing": "trailing",
}
# Noise schedules a base can be trained with (`train-base --noise-schedule`): the default cosine one
# (zero terminal SNR: alpha_bar_T ~ 2e-9) and Stable Diffusion's (alpha_bar_T ~ 0.0047).
NOISE_SCHEDULES: dict[str, dict[str, Any]] = {
    "cosine": SCHEDULER_CONFIG,
    "sd": {**SCHEDULER_CONFIG, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
}
EMBED_DIM = 64
# PAG on the 8 x 8 self-attention layers: on the 4 x 4 mid block identity attention changes the
# prediction by ~0.1%, on these by ~4% (measured on the shipped model at t = 200-900).
PAG_LAYERS = ("down_blocks.1", "up_blocks.1")
SLOTS = (tuple(COLORS), SHAPES, tuple(POSITIONS))
DEFAULT_WEIGHTS = "shapes16-base.safetensors"
DEFAULT_GUIDE = "shapes16-guide.safetensors"  # an earlier snapshot of the same run (autoguidance)


class PromptEncoder(nn.Module):
    """Prompt -> 3 tokens (color, shape, position), each a learned embedding plus a slot
    embedding. Index 0 of every slot is the null token: the empty prompt is all-null."""

    def __init__(self, dim: int = EMBED_DIM) -> None:
        super().__init__()
        self.tables = nn.ModuleList([nn.Embedding(len(words) + 1, dim) for words in SLOTS])
        self.slot = nn.Parameter(torch.zeros(len(SLOTS), dim))

    @staticmethod
    def tokenize(prompts: Sequence[str]) -> torch.Tensor:
        """(B, 3) token ids; raises on unknown words."""
        ids = []
        for text in prompts:
            p = parse_prompt(text)
            attrs = (None, None, None) if p is None else (p.color, p.shape, p.position)
            ids.append([0 if a is None else words.index(a) + 1 for a, words in zip(attrs, SLOTS)])
        return torch.tensor(ids, dtype=torch.long)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        tokens = [table(ids[:, k]) for k, table in enumerate(self.tables)]
        return torch.stack(tokens, dim=1) + self.slot


class Shapes16Backbone(DenoiserBackboneMixin):
    """Backbone protocol for the embedded model (pixel space: latents are 3 x 16 x 16 images)."""

    name = "shapes16-unet"
    shipped_weights = {"refined": "shapes16-refiner", "golden": "shapes16-npnet.safetensors"}
    """The package's weights files the methods load when the user names none."""
    world = "shapes16"
    """The embedded world: the bench scores it with its judges (`evaluation.bench.SUITES`)."""
    default_scorer = "judge"
    """Search methods and target filtering score with the primary judge unless told otherwise."""

    def __init__(self, unet: UNet2DConditionModel, prompt_encoder: PromptEncoder,
                 pag_layers: Sequence[str] = PAG_LAYERS, scheduler_config: dict[str, Any] = SCHEDULER_CONFIG) -> None:
        self.denoiser = unet
        # Trailing spacing, so the sampler's first step is at t = T (the schedule has zero terminal
        # SNR); cards written before the spacing was recorded lack it, and were always sampled so.
        self.scheduler_config = {"timestep_spacing": SCHEDULER_CONFIG["timestep_spacing"], **scheduler_config}
        self.prompt_encoder = prompt_encoder
        self.pag_layers = tuple(pag_layers)
        self._pag = install_pag_processors(unet, self.pag_layers)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def create(cls, seed: int = 0, scheduler_config: dict[str, Any] = SCHEDULER_CONFIG) -> "Shapes16Backbone":
        """A freshly initialised (untrained) model."""
        torch.manual_seed(seed)
        return cls(UNet2DConditionModel(**UNET_CONFIG), PromptEncoder(), scheduler_config=scheduler_config)

    @classmethod
    def load(cls, path: str | Path | None = None, pag_layers: Sequence[str] = PAG_LAYERS) -> "Shapes16Backbone":
        """Load weights (the shipped base model, with its shipped guide model for autoguidance, when
        `path` is None), with the noise schedule their card (the `.json` beside them) records; a file
        without a card gets the default schedule."""
        if not path:
            return attach_guide(cls.load(shipped_path(DEFAULT_WEIGHTS), pag_layers), cls.load(shipped_path(DEFAULT_GUIDE)))
        path = Path(path)
        tensors = load_tensors(path)
        card = path.with_suffix(".json")
        scheduler = read_json(card).get("scheduler", SCHEDULER_CONFIG) if card.is_file() else SCHEDULER_CONFIG
        model = cls(UNet2DConditionModel(**UNET_CONFIG), PromptEncoder(), pag_layers, scheduler)
        try:
            model.denoiser.load_state_dict(_strip(tensors, "unet."))
            model.prompt_encoder.load_state_dict(_strip(tensors, "prompt_encoder."))
        except RuntimeError as err:
            raise NoiseRefineError(f"{path} is not a shapes16 base model ({str(err).splitlines()[0]})") from None
        model.eval()
        return model

    def save(self, path: str | Path, card: dict[str, Any] | None = None) -> None:
        tensors = {f"unet.{k}": v for k, v in self.denoiser.state_dict().items()}
        tensors |= {f"prompt_encoder.{k}": v for k, v in self.prompt_encoder.state_dict().items()}
        save_tensors(Path(path), tensors)
        write_json(Path(path).with_suffix(".json"), {
            "architecture": self.name, "unet": UNET_CONFIG, "scheduler": self.scheduler_config, **(card or {})})

    def eval(self) -> "Shapes16Backbone":
        self.denoiser.eval()
        self.prompt_encoder.eval()
        return self

    def parameters(self):
        yield from self.denoiser.parameters()
        yield from self.prompt_encoder.parameters()

    # -- protocol -----------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        return self.name

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (3, IMAGE_SIZE, IMAGE_SIZE)

    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        ids = PromptEncoder.tokenize(prompts).to(self.device)
        return {"encoder_hidden_states": self.prompt_encoder(ids).to(self.dtype)}

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self.denoiser(x_t, batch_timesteps(t, x_t), encoder_hidden_states=cond["encoder_hidden_states"]).sample

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
