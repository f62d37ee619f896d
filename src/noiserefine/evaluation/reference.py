"""Fréchet distance of generated images to a folder of reference images, through torchmetrics.

FD = ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)) over features of the two sets (Heusel
et al. 2017), computed by torchmetrics' `FrechetInceptionDistance` with one of two feature models,
and the table names the one used, so that FD in CLIP space is never read as FID:

- Inception-v3 (FID proper): torchmetrics' torch-fidelity InceptionV3 (2048-d pool features) with
  the FID weights from a local file (torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`):
  `--fd-model FILE`. Needs the `torch-fidelity` package (which pulls torchvision).
- CLIP image embeddings (FD_CLIP, Kynkäänniemi et al. 2023; clean-fid's `clip_vit_b_32` mode): the
  projected, unnormalised image embedding of a local transformers CLIP folder: `--fd-model FOLDER`.

Both sets are prepared alike: RGB, shortest side resized to the feature model's input size
(bicubic, PIL) and centre-cropped square, as 8-bit images (generated ones as their PNGs hold them).
The reference features are computed once per run; each bench row then adds its own.
"""

from __future__ import annotations

from pathlib import Path
import numpy as np
import torch
from torch import nn

from noiserefine.errors import NoiseRefineError
from noiserefine.evaluation.scorers import CLIPEmbedder
from noiserefine.sampling import to_uint8

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
INCEPTION_SIZE = 299
BATCH = 64


class CLIPFeatures(nn.Module):
    """(B, 3, S, S) uint8 -> (B, D) projected CLIP image embeddings (not normalised)."""

    def __init__(self, embedder: CLIPEmbedder) -> None:
        super().__init__()
        self.embedder = embedder
        self.num_features = embedder.model.config.projection_dim
        self.input_size = embedder.processor.crop_size["height"]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        clip = self.embedder
        pixels = clip.processor(images=list(images.permute(0, 2, 3, 1).cpu().numpy()), return_tensors="pt").pixel_values
        pooled = clip.model.vision_model(pixel_values=pixels.to(clip.device, clip.model.dtype)).pooler_output
        return clip.model.visual_projection(pooled).float()


class ReferenceFD:
    """FD of image sets to a reference folder under a named feature model (see the module)."""

    def __init__(self, reference: str | Path, fd_model: str | Path | None, device: str | torch.device = "cpu") -> None:
        self.files = reference_files(reference)
        if fd_model is None:
            raise NoiseRefineError("FD against --reference needs a feature model: --fd-model FILE (Inception-v3 FID "
                                   "weights) or FOLDER (a local CLIP folder: FD in CLIP space), or --clip-model")
        self.metric, self.input_size, self.name = _metric(Path(fd_model), device)
        self.device = torch.device(device)
        for lo in range(0, len(self.files), BATCH):
            batch = [_square(_read(f), self.input_size) for f in self.files[lo: lo + BATCH]]
            self.metric.update(torch.from_numpy(np.stack(batch)).to(self.device), real=True)

    def __call__(self, images: torch.Tensor) -> float:
        """FD of `images` (B, 3, H, W) in [-1, 1] to the reference set; NaN for fewer than 2 images."""
        if len(images) < 2:
            return float("nan")
        self.metric.reset()  # keeps the reference features (reset_real_features=False)
        for lo in range(0, len(images), BATCH):
            batch = [_square(a, self.input_size) for a in to_uint8(images[lo: lo + BATCH])]
            self.metric.update(torch.from_numpy(np.stack(batch)).to(self.device), real=False)
        return float(self.metric.compute())

    def record(self) -> dict[str, object]:
        return {"fd_features": self.name, "reference_images": len(self.files)}


def reference_files(folder: str | Path) -> list[Path]:
    """The image files of a reference folder, sorted; at least two."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NoiseRefineError(f"reference folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise NoiseRefineError(f"reference folder {folder} holds {len(files)} image(s) ({', '.join(IMAGE_SUFFIXES)}); "
                               "FD needs at least 2 (and thousands for a stable figure)")
    return files


def _metric(fd_model: Path, device: str | torch.device):
    """(torchmetrics FID metric, input size, feature-model name) for a CLIP folder or Inception weights."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError:
        raise NoiseRefineError("FD against a reference folder needs torchmetrics: pip install 'noiserefine[eval]'") \
            from None
    if fd_model.is_dir():
        features = CLIPFeatures(CLIPEmbedder(fd_model, device, what="FD feature model"))
        metric = FrechetInceptionDistance(feature=features, reset_real_features=False, normalize=False)
        return metric.to(device), features.input_size, f"FD_CLIP ({fd_model.name})"
    if not fd_model.is_file():
        raise NoiseRefineError(f"FD feature model not found: {fd_model} (an Inception-v3 weights file or a CLIP folder)")
    try:
        metric = FrechetInceptionDistance(feature=2048, reset_real_features=False,
                                          feature_extractor_weights_path=str(fd_model))
    except ModuleNotFoundError as err:
        raise NoiseRefineError(f"FID with Inception-v3 needs the torch-fidelity package ({err}); or pass a local CLIP "
                               "folder as --fd-model for FD in CLIP space") from None
    return metric.to(device), INCEPTION_SIZE, "FID (Inception-v3)"


def _read(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise NoiseRefineError(f"reference image {path} cannot be read ({err})") from None


def _square(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, size, size) uint8: shortest side to `size` (bicubic), centre crop."""
    from PIL import Image

    img = Image.fromarray(image)
    scale = size / min(img.size)
    w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
    img = img.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size))).transpose(2, 0, 1).copy()
