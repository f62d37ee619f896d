"""Shared fixtures. Tiny real components are built from config, offline (tests/sd_components.py)."""

from __future__ import annotations

import pytest
import torch

# Tiny models on a 2-core machine: one thread avoids OpenMP thrashing and keeps tests fast.
torch.set_num_threads(1)  # for the whole session: no test module needs to set it again


@pytest.fixture
def tiny_sd_pipe():
    """A StableDiffusionPipeline on tiny seeded components: DDIM (trailing, clip_sample=False),
    no safety checker. Built fresh per test, so tests may swap its scheduler or processors."""
    from sd_components import make_tiny_sd_pipe  # lazy: transformers costs seconds to import

    return make_tiny_sd_pipe()


@pytest.fixture
def tiny_shapes16():
    """An untrained shapes16 backbone (the real architecture, seeded)."""
    from noiserefine.backbones.shapes16 import Shapes16Backbone

    return Shapes16Backbone.create(0)
