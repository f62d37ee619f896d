"""The contract of `noiserefine report`: one item per paper claim, each a function of a
`ReportContext` that returns an `ItemResult`; expensive intermediate results are cached under
DIR/cache so a re-run (or a killed run) reuses them.

An item module defines functions decorated with `@item(key, title, paper, cost)` and is listed in
`report.items.ITEM_MODULES`; `report.run` calls every registered item in order and renders the page.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from safetensors.torch import load_file, save_file

Verdict = Literal["agrees", "differs", "not applicable"]
VERDICTS: tuple[str, ...] = ("agrees", "differs", "not applicable")


@dataclass
class ItemResult:
    """What one item shows: our figures against the paper's claim, and a verdict with its reason.

    `table` rows are dicts with the same keys (the first row's keys are the column headers); every
    figure is a PNG file name under the report folder, written by the item through `ctx.figure_path`.
    `data` is everything `report.json` keeps for the item (numbers, n, standard errors)."""

    ours: str
    verdict: Verdict
    why: str
    table: list[dict[str, Any]] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")


@dataclass(frozen=True)
class ItemSpec:
    """A registered item: `key` (e.g. "tab2"), its title, the paper's claim and number, and the
    function computing it."""

    key: str
    title: str
    paper: str
    run: Callable[["ReportContext"], ItemResult]


ITEMS: dict[str, ItemSpec] = {}


def item(key: str, title: str, paper: str) -> Callable[[Callable[["ReportContext"], ItemResult]],
                                                        Callable[["ReportContext"], ItemResult]]:
    """Register a report item (decorator). `paper` states the paper's claim with its number."""
    def register(fn: Callable[["ReportContext"], ItemResult]) -> Callable[["ReportContext"], ItemResult]:
        if key in ITEMS:
            raise ValueError(f"report item {key!r} is registered twice")
        ITEMS[key] = ItemSpec(key, title, paper, fn)
        return fn
    return register


@dataclass
class ReportContext:
    """What every item gets: the output folder, the size (`quick` = small n for tests), the bench
    split the figures come from ("test": no choice was made on it) and a cache for reuse on re-run.
    `computed` and `reused` name the cache entries this context computed and read back, in order;
    `captions` holds the caption given to each figure (`figure_path`)."""

    out: Path
    quick: bool = False
    split: str = "test"
    computed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    captions: dict[str, str] = field(default_factory=dict)

    @property
    def cache_dir(self) -> Path:
        path = self.out / "cache"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def n(self, full: int, quick: int) -> int:
        """The image count of an item: `full` in a full run, `quick` under --quick."""
        return quick if self.quick else full

    def figure_path(self, name: str, caption: str = "") -> Path:
        """Where an item writes its PNG `name` (a plain file name, returned in ItemResult.figures);
        `caption` is shown under it on the page."""
        if caption:
            self.captions[name] = caption
        return self.out / name

    def cached_json(self, name: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """`compute()` once; later runs read DIR/cache/<name>.json (written atomically)."""
        path = self.cache_dir / f"{name}.json"
        if path.exists():
            self.reused.append(path.name)
            return json.loads(path.read_text())
        value = compute()
        self.computed.append(path.name)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(value, indent=1))
        tmp.replace(path)
        return value

    def cached_tensors(self, name: str, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """`compute()` once; later runs read DIR/cache/<name>.safetensors (written atomically)."""
        path = self.cache_dir / f"{name}.safetensors"
        if path.exists():
            self.reused.append(path.name)
            return load_file(str(path))
        value = {k: v.contiguous() for k, v in compute().items()}
        self.computed.append(path.name)
        tmp = path.with_suffix(".tmp")
        save_file(value, str(tmp))
        tmp.replace(path)
        return value
