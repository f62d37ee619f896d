"""A refiner as a standard PEFT adapter folder (what `NoiseRefiner.save_pretrained` writes):

    adapter_config.json               peft's LoraConfig: the LoRA on the denoiser, and `modules_to_save`
                                      = [the denoiser's output layer]
    adapter_model.safetensors         peft's weights: the LoRA, and the delta head as the output
                                      layer's `modules_to_save` copy
    scale_conditioning.safetensors    only for guidance-scale-conditioned refiners (appendix A.4):
                                      peft has no place for the scale projection
    noiserefine.json                  format, base-model fingerprint, timestep T, teacher, training record
    README.md                         model card with YAML metadata (library_name, base_model, tags)

So stock peft opens it: `PeftModel.from_pretrained(denoiser, folder)` evaluated at (x_T, T, c) is
delta_phi(x_T, c) (section 3.3; a scale-conditioned refiner also needs its scale embedding).
The refiner's own weight names (`NoiseRefiner.refiner_state_dict`: `lora.*`, `delta_head.*`,
`scale_proj.*`) are mapped to peft's here and back; the folder may be local or a Hugging Face
Hub id (downloaded through huggingface_hub).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard, ModelCardData, snapshot_download
from peft import LoraConfig, PeftType
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME

from noiserefine.errors import NoiseRefineError
from noiserefine.io import load_tensors, read_json, save_tensors, write_json

FOLDER_FORMAT = "noiserefine-refiner-folder/1"
META_FILE = "noiserefine.json"
SCALE_FILE = "scale_conditioning.safetensors"
CARD_FILE = "README.md"
FILES = (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, SCALE_FILE, META_FILE, CARD_FILE)
PEFT_PREFIX = "base_model.model."  # peft's key prefix: PeftModel.base_model (LoraModel).model
CARD_TAGS = ["noiserefine", "noise-refinement", "peft", "lora", "diffusers"]
CARD_BODY = """# NoiseRefine refiner{for_model}

A noise-refining network (Ahn et al., *A Noise is Worth Diffusion Guidance*): a LoRA on the
denoiser, evaluated once at t = {timestep}, maps Gaussian noise x_T to x_T + delta(x_T, c), so that
**unguided** sampling from it approaches its teacher's guided sampling at one extra evaluation.

- teacher: `{teacher}`
- base model: `{architecture}`, weights sha256 `{weights}`
- guidance-scale conditioning: {conditioned}
{training}{sampler}
## Use

```python
import torch
from noiserefine.diffusers_integration import NoiseRefinePipeline

refined = NoiseRefinePipeline.from_pipe(pipe, "<this folder or Hub id>")  # pipe: the base model's pipeline
images = refined("a photo of a cat", generator=torch.Generator().manual_seed(0)).images
```

The folder is a standard PEFT adapter (a LoRA, and `modules_to_save` for the output layer: the
delta head): `PeftModel.from_pretrained(unet, folder)` evaluated at t = {timestep} gives the delta.
"""
_HUB_CACHE = re.compile(r"models--(?P<owner>[^/]+?)--(?P<name>[^/]+)/snapshots/")


def to_peft_weights(state: dict[str, torch.Tensor], output_layer: str) -> tuple[dict, dict]:
    """(peft's adapter weights, the scale projection's weights) from a `refiner_state_dict`."""
    peft, scale = {}, {}
    for key, value in state.items():
        group, name = key.split(".", 1)
        if group == "lora":
            peft[PEFT_PREFIX + name] = value
        elif group == "delta_head":
            peft[f"{PEFT_PREFIX}{output_layer}.{name}"] = value
        elif group == "scale_proj":
            scale[name] = value
        else:
            raise NoiseRefineError(f"not a refiner weight: {key!r}")
    return peft, scale


def from_peft_weights(peft: dict[str, torch.Tensor], scale: dict[str, torch.Tensor],
                      output_layer: str) -> dict[str, torch.Tensor]:
    """The inverse of `to_peft_weights`: a `refiner_state_dict`."""
    head = f"{PEFT_PREFIX}{output_layer}."
    state = {}
    for key, value in peft.items():
        if not key.startswith(PEFT_PREFIX):
            raise NoiseRefineError(f"adapter weight {key!r} lacks peft's {PEFT_PREFIX!r} prefix")
        state[f"delta_head.{key[len(head):]}" if key.startswith(head) else f"lora.{key[len(PEFT_PREFIX):]}"] = value
    return state | {f"scale_proj.{k}": v for k, v in scale.items()}


def write_folder(folder: Path, state: dict[str, torch.Tensor], lora: LoraConfig, meta: dict[str, Any],
                 card: ModelCard) -> Path:
    """Write a refiner folder (files as in the module docstring); `noiserefine.json` last, so a
    folder whose save was interrupted is not mistaken for a complete new one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    peft, scale = to_peft_weights(state, lora.modules_to_save[0])
    lora.save_pretrained(str(folder))
    save_tensors(folder / SAFETENSORS_WEIGHTS_NAME, peft)
    if scale:
        save_tensors(folder / SCALE_FILE, scale)
    else:
        (folder / SCALE_FILE).unlink(missing_ok=True)  # from an earlier, conditioned refiner saved here
    card.save(folder / CARD_FILE)
    write_json(folder / META_FILE, meta)
    return folder


def read_folder(path_or_id: str | Path, revision: str | None = None
                ) -> tuple[dict[str, torch.Tensor], LoraConfig, dict[str, Any]]:
    """(`refiner_state_dict`, the LoRA config, noiserefine.json) of a local folder or Hub id."""
    folder = local_folder(path_or_id, revision)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise NoiseRefineError(f"{folder} is not a NoiseRefine refiner folder (no {META_FILE})")
    meta = read_json(meta_path)
    if meta.get("format") != FOLDER_FORMAT:
        raise NoiseRefineError(f"{meta_path} is not a NoiseRefine refiner folder card ({meta.get('format')!r})")
    lora = _lora_config(folder)
    scale = load_tensors(folder / SCALE_FILE) if meta["config"].get("scale_conditioning") else {}
    state = from_peft_weights(load_tensors(folder / SAFETENSORS_WEIGHTS_NAME), scale, lora.modules_to_save[0])
    return state, lora, meta


def _lora_config(folder: Path) -> LoraConfig:
    if not (folder / CONFIG_NAME).is_file():
        raise NoiseRefineError(f"refiner folder {folder} lacks {CONFIG_NAME}")
    config = LoraConfig.from_pretrained(str(folder))
    if (config.peft_type != PeftType.LORA or len(config.modules_to_save or []) != 1
            or isinstance(config.target_modules, str)):
        raise NoiseRefineError(f"{folder / CONFIG_NAME} is not a refiner's adapter: expected a LoRA on named "
                               f"modules with one module to save (the output layer), got {config.peft_type}, {config.modules_to_save}")
    return config


def local_folder(path_or_id: str | Path, revision: str | None = None) -> Path:
    """A local refiner folder as is; anything else is taken for a Hub id and downloaded (cached)."""
    path = Path(path_or_id)
    if path.is_dir():
        return path
    if path.exists():
        raise NoiseRefineError(f"{path} is a file, not a refiner folder")
    try:
        return Path(snapshot_download(str(path_or_id), revision=revision, allow_patterns=list(FILES)))
    except ValueError:  # huggingface_hub's HFValidationError: not a repo id at all
        raise NoiseRefineError(f"refiner not found: {path_or_id} (no such folder, and not a Hugging Face Hub id)") \
            from None
    except OSError as err:  # offline, unknown repo or revision, HTTP errors
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise NoiseRefineError(f"refiner {path_or_id!r}: no such local folder, and the Hugging Face Hub could not "
                               f"provide it ({reason})") from None


def hub_id(name_or_path: str | None) -> str | None:
    """The Hub id a model was loaded from, read off its `_name_or_path` (a Hub id, or a folder of
    huggingface_hub's cache, `.../models--owner--name/snapshots/...`); None for a local folder."""
    if not name_or_path:
        return None
    found = _HUB_CACHE.search(str(name_or_path).replace("\\", "/"))
    if found:
        return f"{found['owner']}/{found['name']}"
    looks_like_id = re.fullmatch(r"[\w.-]+/[\w.-]+", str(name_or_path)) is not None
    return str(name_or_path) if looks_like_id and not Path(name_or_path).exists() else None


def model_card(meta: dict[str, Any], base_model: str | None) -> ModelCard:
    """A model card as diffusers' training scripts write one (huggingface_hub's ModelCard): YAML
    metadata, then what the folder is and how to use it."""
    data = ModelCardData(library_name="noiserefine", base_model=base_model, tags=list(CARD_TAGS))
    config, training = meta["config"], meta.get("training")
    body = CARD_BODY.format(
        for_model=f" for {base_model}" if base_model else "", timestep=config["timestep"],
        teacher=json.dumps(config.get("teacher") or {}, sort_keys=True),
        architecture=meta["base"].get("architecture"), weights=meta["base"].get("weights_sha256"),
        conditioned=bool(config.get("scale_conditioning")),
        training=(f"- training: {training.get('steps')} steps, loss `{training.get('loss')}`, rank "
                  f"{training.get('rank')}, lr {training.get('lr')}\n" if training else ""),
        sampler="".join(f"- {what}: {_sampler_line(meta[key])}\n" for key, what in
                        (("teacher_sampler", "teacher's sampler"), ("sampler", "sampler inside the loss")) if meta.get(key)))
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def _sampler_line(record: dict[str, Any]) -> str:
    """A sampler record (`sampling.sampler_record`) in words: the refiner samples best on it."""
    settings = ", ".join(f"{k} {record[k]}" for k in ("timestep_spacing", "steps_offset", "prediction_type") if k in record)
    return f"`{record.get('class', record.get('scheduler'))}` ({settings}), timesteps {record.get('timesteps')}"
