"""`noiserefine report`: run every registered item (`report.items`) in page order, then write
DIR/report.json and DIR/index.html (`report.page`) with the PNGs the items drew beside it.

The folder follows `io.OutputFolder`: one holding a report (a finished page, or only the cache of
a killed run) is refused unless `resume` (reuse the cache: a killed run goes on where it stopped, a
finished one is re-rendered) or `overwrite` (delete the report and its cache first). A resumed
folder must have been made with the same size (`quick`) and split. An item that raises fails the
report, naming the item; what it and the items before it cached stays for `resume`.
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from noiserefine.errors import NoiseRefineError
from noiserefine.evaluation.bench import SPLITS
from noiserefine.io import OutputFolder, atomic_write_bytes, read_json, write_json
from noiserefine.report import page
from noiserefine.report.core import ItemResult, ItemSpec, ReportContext
from noiserefine.report.items import load_items

RESULTS = ("index.html", "report.json", "*.png", "cache")
"""What a report writes into its folder (`OutputFolder` results)."""
logger = logging.getLogger(__name__)
SETTINGS = "settings.json"
"""The size and split a report folder's cache was made with (in DIR/cache)."""
HISTORY = "runs.json"
"""Every run of a report folder (in DIR/cache): command, date, commit, minutes, results computed. A page
re-rendered with --resume thereby still says how long computing its results took."""


class ReportItemError(RuntimeError):
    """An item raised something other than a user error: the report fails naming the item (the
    original error is its cause, with its traceback)."""


def run_report(out: Path, quick: bool = False, resume: bool = False, overwrite: bool = False,
               split: str = "test") -> Path:
    """Run every item into `out` and render the page; returns the path of index.html."""
    folder = _check_folder(Path(out), quick, split, resume, overwrite)
    specs = load_items()
    if not specs:
        raise NoiseRefineError("no report items are registered")
    started, clock, commit = datetime.now(timezone.utc), time.monotonic(), _commit()  # the code that runs
    out = folder.open()
    ctx = ReportContext(out, quick=quick, split=split)
    write_json(ctx.cache_dir / SETTINGS, {"quick": quick, "split": split})
    items = [_run_item(ctx, spec, k, len(specs)) for k, spec in enumerate(specs, start=1)]
    meta = {"command": _command(out, quick, resume, overwrite), "date": started.isoformat(timespec="seconds"),
            "commit": commit, "split": split, "quick": quick, "seconds": time.monotonic() - clock,
            "machine": f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch thread(s), {platform.machine()}",
            "verdicts": dict(Counter(i["verdict"] for i in items)), "items": len(items)}
    meta["history"] = _record_run(ctx, meta, computed=sum(len(i["computed"]) for i in items))
    write_json(out / "report.json", {"meta": meta, "items": items})
    atomic_write_bytes(out / "index.html", page.render(meta, items).encode())
    return out / "index.html"


def _record_run(ctx: ReportContext, meta: dict[str, Any], computed: int) -> list[dict[str, Any]]:
    """Append this run to the folder's run history (cache/runs.json); returns the whole history."""
    path = ctx.cache_dir / HISTORY
    history = read_json(path) if path.is_file() else []
    history.append({key: meta[key] for key in ("command", "date", "commit", "machine")}
                   | {"minutes": round(meta["seconds"] / 60, 1), "computed": computed})
    write_json(path, history)
    return history


def _check_folder(out: Path, quick: bool, split: str, resume: bool, overwrite: bool) -> OutputFolder:
    """Validate the options and the folder before anything is created (see the module docstring)."""
    if resume and overwrite:
        raise NoiseRefineError("--resume reuses the report in --out and --overwrite deletes it: pass one of them")
    if split not in SPLITS:
        raise NoiseRefineError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    folder = OutputFolder(out, RESULTS, overwrite=overwrite, resume=resume)
    found = folder.existing()
    if found and not (resume or overwrite):
        state = "a report" if (out / "index.html").exists() else "the cache of an unfinished report"
        raise NoiseRefineError(f"{out} already holds {state}; pass --resume to reuse its cache (and re-render the "
                               f"page), --overwrite to replace it, or choose another folder")
    folder.check()
    settings = out / "cache" / SETTINGS
    if resume and settings.is_file():
        made = read_json(settings)
        if made != {"quick": quick, "split": split}:
            raise NoiseRefineError(f"{out} holds a report made with quick={made.get('quick')}, split="
                                   f"{made.get('split')}; resume it with the same options, or pass --overwrite")
    return folder


def _run_item(ctx: ReportContext, spec: ItemSpec, k: int, total: int) -> dict[str, Any]:
    """Run one item with a progress line; its record for report.json."""
    logger.info("[%d/%d] %s: %s", k, total, spec.key, spec.title)
    before, clock = (len(ctx.computed), len(ctx.reused)), time.monotonic()
    try:
        result = spec.run(ctx)
    except NoiseRefineError as err:
        raise NoiseRefineError(f"report item {spec.key!r} failed: {err}") from err
    except Exception as err:
        raise ReportItemError(f"report item {spec.key!r} ({spec.title}) failed: {type(err).__name__}: {err}") from err
    _check_result(ctx, spec, result)
    seconds, computed, reused = time.monotonic() - clock, ctx.computed[before[0]:], ctx.reused[before[1]:]
    logger.info("      %s (%.1f s; %d result(s) computed)", result.verdict, seconds, len(computed))
    return {"key": spec.key, "title": spec.title, "paper": spec.paper, "ours": result.ours,
            "verdict": result.verdict, "why": result.why, "table": result.table, "figures": result.figures,
            "captions": {name: ctx.captions[name] for name in result.figures if name in ctx.captions},
            "data": result.data, "seconds": round(seconds, 2), "computed": computed, "reused": reused}


def _check_result(ctx: ReportContext, spec: ItemSpec, result: Any) -> None:
    """An item returns an ItemResult whose figures exist beside the page and whose table rows
    share the first row's columns."""
    if not isinstance(result, ItemResult):
        raise ReportItemError(f"report item {spec.key!r} returned {type(result).__name__}, not an ItemResult")
    missing = [name for name in result.figures if Path(name).name != name or not ctx.figure_path(name).is_file()]
    if missing:
        raise ReportItemError(f"report item {spec.key!r} names figures it did not write: {missing}")
    if any(set(row) != set(result.table[0]) for row in result.table):
        raise ReportItemError(f"report item {spec.key!r} has table rows with different columns")


def _command(out: Path, quick: bool, resume: bool, overwrite: bool) -> str:
    flags = [name for name, on in (("--quick", quick), ("--resume", resume), ("--overwrite", overwrite)) if on]
    return " ".join(["noiserefine report --out", str(out), *flags])


def _commit() -> str:
    """The source tree's git commit, with '+ uncommitted changes' when it has any."""
    here = Path(__file__).parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit + (" + uncommitted changes" if dirty else "")
