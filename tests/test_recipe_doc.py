"""docs/real-models.md's recipe (steps 1-4) runs as written (issue 14: "the preset recipe runs verbatim on
a tiny model").

The commands are read from the page's ```bash blocks, not copied here, so an edit of the page that
breaks a command breaks this test. They run through the CLI on a tiny SD pipeline built from config
with Stable Diffusion 2.1's scheduler configuration. What changes, and only that:
- `--model` points at the tiny pipeline's folder (the page says `--model <local folder>` replaces the
  preset's Hub id);
- sizes: a few seeds, 2 training steps, n = 4 (the preset's 62,500 seeds would take days);
- files the user brings (`prompts/`, `models/`, `data/`) are tiny stand-ins, and `runs/` lives in tmp;
- `accelerate launch ... -m noiserefine.cli` runs as the CLI in this process (one CPU process);
- the scorers whose packages are not installed here (HPSv2, ImageReward, Inception FID: they pull
  torchvision) are dropped from the bench command; a separate test checks that keeping them gives a
  clear error naming the package, not a crash.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from sd_components import make_tiny_sd21_pipe, save_tiny_clip

from noiserefine.cli import main
from noiserefine.io import save_tensors

DOC = Path(__file__).resolve().parents[1] / "docs" / "real-models.md"
SECTION = "## The recipe, top to bottom"
ABSENT = ("--hpsv2-model", "--imagereward-model", "--fd-model")  # packages not installed here
SIZES = {"targets": ["--seeds", "0-7", "--batch-size", "4", "--shard-size", "4"],
         "train": ["--steps", "2", "--batch-size", "2", "--validation-every", "1"],
         "sample": ["--seeds", "0-1"],
         "bench": ["--n", "4", "--batch-size", "2"]}


def recipe_commands() -> list[list[str]]:
    """The argument lists of the recipe section's bash blocks, in page order: CLI commands, and
    `mkdir -p` lines as ["mkdir", folder]."""
    text = DOC.read_text()
    section = text[text.index(SECTION):]
    section = section[:section.index("\n## ", 1)]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if "noiserefine.cli" in words:
                commands.append(words[words.index("noiserefine.cli") + 1:])
            elif words[:1] == ["noiserefine"]:
                commands.append(words[1:])
            elif words[:2] == ["mkdir", "-p"]:
                commands += [["mkdir", folder] for folder in words[2:]]
    return commands


def set_option(args: list[str], name: str, value: str) -> list[str]:
    """`args` with option `name` set to `value` (replaced where present, appended where not)."""
    if name in args:
        i = args.index(name)
        return args[:i + 1] + [value] + args[i + 2:]
    return args + [name, value]


def drop_option(args: list[str], name: str) -> list[str]:
    i = args.index(name)
    return args[:i] + args[i + 2:]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """The user's files: a pipeline folder, prompt files, scorer models, a reference image folder."""
    root = tmp_path_factory.mktemp("recipe")
    make_tiny_sd21_pipe().save_pretrained(root / "sd21")
    (root / "prompts").mkdir()
    for name in ("coco_pickapic.txt", "eval.txt", "coco_val.txt"):
        (root / "prompts" / name).write_text("a red circle on the left\na photo of a cat\na blue square on the top\n")
    (root / "models").mkdir()
    save_tiny_clip(root / "models" / "clip-vit-large-patch14")
    save_tiny_clip(root / "models" / "pickscore", seed=1)
    torch.manual_seed(1)  # the LAION aesthetic MLP's layout (Linear / Dropout / ...), on 16-d embeddings
    layers = {0: (16, 8), 2: (8, 4), 4: (4, 1)}
    save_tensors(root / "models" / "aesthetic-l14.safetensors",
                 {f"layers.{i}.{p}": torch.randn(o, n) if p == "weight" else torch.randn(o)
                  for i, (n, o) in layers.items() for p in ("weight", "bias")})
    ref = root / "data" / "coco_val2014_5k"
    ref.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(ref / f"{i}.png")
    return root


def localised(args: list[str], root: Path) -> list[str]:
    """The page's command for this workspace: the user's relative paths under `root`, the tiny model, small sizes."""
    args = [str(root / a) if a.startswith(("runs/", "prompts/", "models/", "data/")) else a for a in args]
    args = set_option(args, "--model", str(root / "sd21"))
    for name, value in zip(SIZES[args[0]][::2], SIZES[args[0]][1::2]):
        args = set_option(args, name, value)
    return args


def invoke(args: list[str]):
    return CliRunner().invoke(main, args, catch_exceptions=False)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one mixed-precision mode per process (the preset trains in bf16; earlier
    tests in this process trained in fp32), as a fresh `accelerate launch` has."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_the_page_has_the_four_steps():
    assert [c[0] for c in recipe_commands()] == ["mkdir", "targets", "train", "sample", "bench"]


def test_recipe_runs_as_written(workspace, fresh_accelerate_state):
    mkdir, targets, train, sample, bench = recipe_commands()
    (workspace / mkdir[1]).mkdir(parents=True)
    targets, train, sample, bench = (localised(c, workspace) for c in (targets, train, sample, bench))
    result = invoke(targets)
    assert result.exit_code == 0, result.output
    manifest = json.loads((workspace / "runs/sd21/targets/manifest.json").read_text())
    teacher = manifest["spec"]["teacher"]
    assert (teacher["cfg"], teacher["pag"], teacher["steps"]) == (7.0, 3.0, 20)  # the preset's teacher
    assert manifest["spec"]["score"] == "aesthetic" and manifest["sampler"]["timestep_spacing"] == "leading"

    result = invoke(train)
    assert result.exit_code == 0, result.output
    refiner = workspace / "runs/sd21/refiner/refiner"
    assert json.loads((refiner / "adapter_config.json").read_text())["r"] == 128  # the preset's rank
    assert sorted(p.name for p in (workspace / "runs/sd21/refiner/validation").glob("*.png"))
    assert list((workspace / "runs/sd21/refiner/logs").rglob("events.out.tfevents.*"))

    result = invoke(sample)
    assert result.exit_code == 0, result.output
    assert len(list((workspace / "runs/sd21/samples").glob("*.png"))) == 3 * 2

    result = invoke(_without_absent(bench))
    assert result.exit_code == 0, result.output
    rows = json.loads((workspace / "runs/sd21/bench/bench.json").read_text())["rows"]
    assert len(rows) == 3  # unguided, the teacher (added), refined
    assert all({"clip_score", "pickscore"} <= set(r) for r in rows), rows[0].keys()
    assert len(list((workspace / "runs/sd21/bench/grids").glob("*.png"))) == 3


def _without_absent(args: list[str]) -> list[str]:
    for name in ABSENT:
        args = drop_option(args, name)
    return args


@pytest.mark.parametrize("option", ABSENT)
def test_absent_scorer_packages_are_named(workspace, option, tmp_path):
    """Kept as written, each scorer whose package is missing stops the bench with one clear line."""
    bench = localised(recipe_commands()[4], workspace)
    for other in ABSENT:
        if other != option:
            bench = drop_option(bench, other)
    bench = set_option(bench, "--out", str(tmp_path / "bench"))
    weights = Path(bench[bench.index(option) + 1])  # present, so what is missing is the package
    if not weights.exists():
        weights.write_bytes(b"not read: the package check comes first")
    result = invoke(bench)
    assert result.exit_code == 2
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error:") and "pip install" in last, result.output
    assert not (tmp_path / "bench").exists()  # refused before anything was made
