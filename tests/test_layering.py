"""The floors of the architecture (docs/architecture.md): a module imports only from its own floor or the
floors below it -- module-level and function-level imports alike -- and every module has a floor."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "noiserefine"

# Top to bottom. A module is named by its path under the package without ".py"; a folder covers
# every module in it.
FLOORS: list[tuple[str, tuple[str, ...]]] = [
    ("face", ("cli", "demo", "__init__")),
    ("report", ("report",)),
    ("facade", ("api", "diffusers_integration", "samples")),
    ("evaluation", ("evaluation", "analysis")),
    ("training", ("targets", "train", "train_base", "training_loop", "npnet_pairs", "train_npnet", "train_monitor",
                  "plan")),
    ("methods", ("methods",)),
    ("core", ("sampling", "guidance", "generation", "inversion", "scoring")),
    ("backbones", ("backbones", "presets")),
    ("world", ("world",)),
    ("support", ("io", "checkpoint", "errors", "shards", "grids", "prompt_files")),
]


def floor_of(module: str) -> int:
    """Index of `module`'s floor (0 = top), by the longest matching entry."""
    matches = [(len(entry), i) for i, (_, entries) in enumerate(FLOORS) for entry in entries
               if module == entry or module.startswith(entry + "/")]
    if not matches:
        raise AssertionError(f"module {module!r} has no floor: add it to FLOORS and to docs/architecture.md")
    return max(matches)[1]


def modules() -> list[str]:
    return sorted(str(p.relative_to(PACKAGE).with_suffix("")) for p in PACKAGE.rglob("*.py"))


def imported(module: str) -> set[str]:
    """The package modules `module` imports anywhere in its source."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("noiserefine"):
            base = node.module.removeprefix("noiserefine").lstrip(".").replace(".", "/")
            names |= {f"{base}/{a.name}" if base else a.name for a in node.names} | {base}
        elif isinstance(node, ast.Import):
            names |= {a.name.removeprefix("noiserefine.").replace(".", "/") for a in node.names
                      if a.name.startswith("noiserefine.")}
    known = set(modules()) | {str(Path(m).parent) for m in modules()}
    return {n for n in names if n in known and n}


@pytest.mark.parametrize("module", modules())
def test_module_imports_only_its_floor_or_below(module):
    mine = floor_of(module)
    above = {m: FLOORS[floor_of(m)][0] for m in imported(module) if floor_of(m) < mine}
    assert not above, f"{module} ({FLOORS[mine][0]}) imports from higher floors: {above}"


def test_the_rule_catches_an_upward_import(tmp_path, monkeypatch):
    """The check itself can fail: a method importing the training floor is reported."""
    source = (PACKAGE / "methods" / "search.py").read_text() + "\nfrom noiserefine.targets import TargetSpec\n"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: source)
    assert "targets" in imported("methods/search")
    assert floor_of("targets") < floor_of("methods/search")
