"""DiT / SiT-style class-conditional backbones: a diffusers `DiTTransformer2DModel` in the latent
space of an AutoencoderKL (Peebles & Xie 2023; SiT: Ma et al. 2024).

Prompts are class ids ("207") or label names from the pipeline's `id2label` ("golden retriever");
the empty prompt "" is the null class (index `num_embeds_ada_norm`, the embedding the model learned
by label dropout), which CFG uses as the unconditional branch, as `DiTPipeline` does with 1000.
With a learned sigma (out_channels = 2 x in_channels) the prediction is the first C channels, as
`DiTPipeline` keeps them.

Two time conventions, chosen by the scheduler the pipeline folder carries:

- diffusion (DiT; DDIM/DDPM/Euler/DPM schedulers): the model sees the scheduler's timestep and
  predicts epsilon, as in `DiTPipeline`.
- flow (SiT; a `FlowMatchEulerDiscreteScheduler`): SiT's linear interpolant x_t = t x_data +
  (1 - t) noise runs from noise at t = 0 to data at t = 1 and its network predicts the velocity
  dx/dt = x_data - noise. diffusers' flow schedulers use sigma = 1 - t (timestep = 1000 sigma) and
  the model output dx/dsigma = noise - x_data, so the adapter feeds t = 1 - sigma and negates.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, DiTTransformer2DModel

from noiserefine.backbones.base import Cond, DenoiserBackboneMixin, batch_timesteps, config_hash, vae_decode
from noiserefine.backbones.pag import install_pag_processors
from noiserefine.errors import NoiseRefineError

# As diffusers' PixArt / SD3 PAG pipelines ("blocks.1", the 2nd transformer block); our layer
# matcher does not let it match transformer_blocks.10-19 as diffusers' regex does.
DEFAULT_PAG_LAYERS = ("transformer_blocks.1",)
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)


class DiTBackbone(DenoiserBackboneMixin):
    """Backbone protocol for `DiTTransformer2DModel` (DiT, or SiT converted to its layout).

    Conditioning: `class_labels` (B,) long. `refiner_defaults` tell `train.py` where the refiner's
    delta head and guidance-scale embedding attach in a DiT (there is no conv_out / time_embedding).
    """

    def __init__(self, transformer: DiTTransformer2DModel, vae: AutoencoderKL, scheduler_config: dict[str, Any],
                 labels: Mapping[str, int] | None = None, pag_layers: Sequence[str] = DEFAULT_PAG_LAYERS) -> None:
        self.denoiser = transformer
        self.vae = vae
        self.scheduler_config = dict(scheduler_config)
        self.flow = self.scheduler_config.get("_class_name") in FLOW_SCHEDULERS
        self.labels = dict(labels or {})
        self.num_classes = int(transformer.config.num_embeds_ada_norm)
        bad = {name: i for name, i in self.labels.items() if not 0 <= i < self.num_classes}
        if bad:
            raise NoiseRefineError(f"label ids outside 0..{self.num_classes - 1}: {dict(list(bad.items())[:3])}")
        self.pag_layers = tuple(pag_layers)
        self._pag = install_pag_processors(transformer, self.pag_layers)
        self.refiner_defaults: dict[str, Any] = {
            "output_layer": "proj_out_2",
            # DiT has no shared time embedding: block 0's AdaLN embedding also conditions the final
            # layer, so a guidance-scale embedding added there reaches block 0 and the output.
            "time_embedding_layer": "transformer_blocks.0.norm1.emb",
        }
        if self.flow:  # refine at pure noise: sigma = 1, SiT's t = 0
            self.refiner_defaults["timestep"] = int(self.scheduler_config.get("num_train_timesteps", 1000))

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_pipeline(cls, pipe: Any, pag_layers: Sequence[str] = DEFAULT_PAG_LAYERS) -> "DiTBackbone":
        """Share the components of a `DiTPipeline` (transformer, vae, scheduler, labels)."""
        missing = [n for n in ("transformer", "vae", "scheduler") if getattr(pipe, n, None) is None]
        if missing or not isinstance(pipe.transformer, DiTTransformer2DModel):
            raise NoiseRefineError(f"expected a DiTPipeline with a DiTTransformer2DModel; lacks {missing or 'it'}")
        # An in-memory scheduler's config lacks `_class_name` (written only on save): name it here.
        scheduler_config = {**pipe.scheduler.config, "_class_name": type(pipe.scheduler).__name__}
        return cls(pipe.transformer, pipe.vae, scheduler_config, labels=getattr(pipe, "labels", None),
                   pag_layers=pag_layers)

    @classmethod
    def from_pretrained(cls, path_or_id: str, torch_dtype: torch.dtype | None = None,
                        pag_layers: Sequence[str] = DEFAULT_PAG_LAYERS, **kw: Any) -> "DiTBackbone":
        """Load a saved DiT pipeline folder or hub id (a SiT folder is a DiTPipeline folder whose
        scheduler is a FlowMatchEulerDiscreteScheduler). `kw` go to `DiffusionPipeline.from_pretrained`."""
        pipe = DiffusionPipeline.from_pretrained(path_or_id, torch_dtype=torch_dtype, **kw)
        return cls.from_pipeline(pipe, pag_layers=pag_layers).eval()

    def eval(self) -> "DiTBackbone":
        self.denoiser.eval()
        self.vae.eval()
        return self

    # -- protocol -----------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        return f"{'sit' if self.flow else 'dit'}-{config_hash(self.denoiser.config)}"

    @property
    def latent_shape(self) -> tuple[int, ...]:
        size = self.denoiser.config.sample_size
        return (self.denoiser.config.in_channels, size, size)

    @property
    def has_null_class(self) -> bool:
        table = self.denoiser.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
        return table.num_embeddings > self.num_classes

    def class_id(self, prompt: str | int) -> int:
        """A class id from an id ("207" or 207), a label name, or "" (the null class)."""
        if prompt == "":
            if not self.has_null_class:
                raise NoiseRefineError("this DiT was trained without label dropout: it has no null class for CFG")
            return self.num_classes
        text = str(prompt).strip()
        if text.isdigit():
            if int(text) >= self.num_classes:
                raise NoiseRefineError(f"class id {text} out of range 0..{self.num_classes - 1}")
            return int(text)
        if text in self.labels:
            return self.labels[text]
        examples = ", ".join(list(self.labels)[:3]) or "no label names in this pipeline"
        raise NoiseRefineError(f"unknown class {prompt!r}: expected an id 0..{self.num_classes - 1} or a label "
                               f"name ({examples})")

    def encode_prompts(self, prompts: Sequence[str | int]) -> Cond:
        if isinstance(prompts, str):
            raise NoiseRefineError("encode_prompts takes a list of prompts, got a single string")
        ids = [self.class_id(p) for p in prompts]
        return {"class_labels": torch.tensor(ids, dtype=torch.long, device=self.device)}

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        emb = self.denoiser.transformer_blocks[0].norm1.emb.class_embedder
        if self.denoiser.training and emb.dropout_prob > 0:
            raise NoiseRefineError("the DiT is in training mode, where it drops class labels at random; "
                                   "call backbone.eval() (the refiner trains LoRA weights, never label dropout)")
        t = batch_timesteps(t, x_t)
        if self.flow:
            t = 1.0 - t.float() / self.scheduler_config.get("num_train_timesteps", 1000)
        out = self.denoiser(x_t, timestep=t, class_labels=cond["class_labels"]).sample
        out = out[:, : x_t.shape[1]]  # learned sigma: the variance channels are not the prediction
        return -out if self.flow else out

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return vae_decode(self.vae, latents)
