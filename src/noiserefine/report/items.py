"""The report's item modules, in page order: each registers its items with `core.item` when
imported. A module not yet written (the item modules are written by different hands) is left out
until it exists."""

from __future__ import annotations

import importlib
import importlib.util

from noiserefine.report.core import ITEMS, ItemSpec

ITEM_MODULES: tuple[str, ...] = (
    "noiserefine.report.bench_items",      # Tab. 2, 6, 7, 5 / Fig. 28, Fig. 24
    "noiserefine.report.training_items",   # Tab. 1 / Fig. 3, Fig. 6 / 35 / 36, Tab. 15, Tab. 14
    "noiserefine.report.analysis_items",   # Fig. 9 / 16, 15, 17 / 18, 11, 13, 22
    "noiserefine.report.transfer_items",   # Tab. 4
    "noiserefine.report.golden_items",     # Golden Noise: NPNet's ablations, the re-denoise probe
    "noiserefine.report.noise_diffusion_items",  # Noise Diffusion: rounds, best-of-N, the update
)


def load_items() -> list[ItemSpec]:
    """Every registered item, in page order: by module in `ITEM_MODULES` order, then in the order
    the module registers them."""
    present = [name for name in ITEM_MODULES if importlib.util.find_spec(name) is not None]
    for name in present:
        importlib.import_module(name)
    order = {name: i for i, name in enumerate(present)}
    specs = [spec for spec in ITEMS.values() if spec.run.__module__ in order]
    return sorted(specs, key=lambda spec: order[spec.run.__module__])
