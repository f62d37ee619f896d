"""The scorer interface of the core: (decoded images in [-1, 1], prompts) -> (B,) scores.

Search methods (Noise Diffusion, best-of-N), NPNet's pair filtering and NoiseRefine's target
filtering take a scorer as an argument; which scorer (the shapes16 judges, CLIP, an aesthetic
predictor) is chosen by name in `noiserefine.evaluation.scorers`, above the methods.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

Scorer = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]
"""(decoded images in [-1, 1], prompts) -> (B,) score, higher is better."""
