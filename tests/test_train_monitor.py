"""Training conventions (issue 14, item 8): the `noiserefine` logger and the CLI's --verbose/--quiet,
accelerate trackers (`--report-to tensorboard`: loss and learning rate per step), validation grids
every K steps, and the training loop's per-step hook."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from noiserefine.backbones.loading import load_backbone
from noiserefine.backbones.shapes16 import Shapes16Backbone
from noiserefine.checkpoint import read_checkpoint
from noiserefine.cli import main
from noiserefine.errors import NoiseRefineError
from noiserefine.guidance import Guidance, Teacher
from noiserefine.targets import TargetSpec, generate_targets
from noiserefine.train import TrainConfig, train_refiner
from noiserefine.train_monitor import Monitoring
from noiserefine.training_loop import LoopSettings, run_training_loop
from noiserefine.world import ALL_PROMPTS

PROMPTS = list(ALL_PROMPTS[:3])
CFG = dict(steps=4, batch_size=2, msd_steps=2, rank=2, checkpoint_every=2, lr=1e-3)
PACKAGE = Path(__file__).resolve().parents[1] / "src" / "noiserefine"


def make_targets(backbone, out: Path) -> Path:
    spec = TargetSpec(PROMPTS, list(range(6)), Teacher(Guidance(cfg=3.0), steps=2), shard_size=3)
    generate_targets(backbone, spec, out, progress=False)
    return out


@pytest.fixture(scope="module")
def targets_dir(tmp_path_factory):
    return make_targets(Shapes16Backbone.create(0), tmp_path_factory.mktemp("t") / "targets")


def test_tracker_logs_loss_and_lr_per_step_and_validation_grids(targets_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monitoring = Monitoring("tensorboard", (PROMPTS[0], PROMPTS[2]), validation_every=2)
    cfg = TrainConfig(**CFG, lr_schedule="cosine")
    train_refiner(Shapes16Backbone.create(0), targets_dir, tmp_path / "run", cfg, progress=False, monitoring=monitoring)
    events = EventAccumulator(str(tmp_path / "run" / "logs" / "noiserefine"))
    events.Reload()
    losses = read_checkpoint(tmp_path / "run" / "checkpoint")["losses"]
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
    np.testing.assert_allclose([e.value for e in events.Scalars("loss")], losses, rtol=1e-6)
    cosine = [cfg.lr * (1 + math.cos(math.pi * s / cfg.steps)) / 2 for s in range(cfg.steps)]  # the rate step s ran at
    np.testing.assert_allclose([e.value for e in events.Scalars("lr")], cosine, rtol=1e-6)

    grids = sorted(p.name for p in (tmp_path / "run" / "validation").iterdir())
    assert grids == ["step-000002.png", "step-000004.png"]
    grid = np.asarray(Image.open(tmp_path / "run" / "validation" / "step-000004.png"))
    # Two prompt rows of two 256 px tiles (Gaussian | refined), below the title and column headers.
    rows = [grid[y: y + 256, 228: 228 + 256 + 8 + 256] for y in (72, 72 + 264)]
    for tiles in rows:
        gaussian, refined = tiles[:, :256].astype(int), tiles[:, 264:].astype(int)
        assert gaussian.std() > 5 and np.abs(gaussian - refined).mean() > 0.5  # images; the refiner changed them


def test_missing_tracker_package_is_refused_before_anything(targets_dir, tmp_path, monkeypatch):
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "_available_trackers", [])
    with pytest.raises(NoiseRefineError, match="--report-to tensorboard needs the tensorboard package.*noiserefine"):
        train_refiner(Shapes16Backbone.create(0), targets_dir, tmp_path / "run", TrainConfig(**CFG), progress=False,
                      monitoring=Monitoring("tensorboard"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"report_to": "printer"}, "unknown tracker"),
    ({"validation_prompts": ("a",)}, "need both"),
    ({"validation_every": 5}, "need both"),
    ({"validation_prompts": ("a",), "validation_every": -1}, "need both"),
])
def test_monitoring_settings_are_checked(kwargs, message):
    with pytest.raises(NoiseRefineError, match=message):
        Monitoring(**kwargs)


def test_loop_reports_every_step_at_its_learning_rate(tmp_path):
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    seen = []
    settings = LoopSettings(tmp_path / "ck", steps=5, lr_schedule="linear", warmup_steps=2, progress=False,
                            on_step=lambda step, loss, lr: seen.append((step, loss, lr)))
    result = run_training_loop(settings, {"net": net}, opt, lambda step: float(step) * 10)
    assert [s for s, _, _ in seen] == [1, 2, 3, 4, 5] and [loss for _, loss, _ in seen] == result.losses
    # diffusers' linear schedule with warmup: s / warmup, then (steps - s) / (steps - warmup)
    np.testing.assert_allclose([lr for _, _, lr in seen], [0.0, 0.25, 0.5, 1 / 3, 1 / 6])


def test_cli_log_levels_and_validation_options(tmp_path):
    targets = make_targets(load_backbone(), tmp_path / "targets")
    base = ["train", "--targets", str(targets), "--steps", "2", "--batch-size", "2", "--msd-steps", "2", "--rank", "2"]
    runner = CliRunner()
    shown = runner.invoke(main, [*base, "--validation-prompts", f"@{tmp_path / 'p.txt'}", "--out", str(tmp_path / "x")])
    assert shown.exit_code == 2 and "prompt file not found" in shown.output
    (tmp_path / "p.txt").write_text("a red circle on the left\n")
    shown = runner.invoke(main, [*base, "--validation-prompts", f"@{tmp_path / 'p.txt'}", "--validation-every", "2",
                                 "--out", str(tmp_path / "a")])
    assert shown.exit_code == 0, shown.output
    assert "noiserefine: training a refiner (msd loss) on 4 targets" in shown.output
    assert "noiserefine: wrote refiner" in shown.output and (tmp_path / "a" / "validation" / "step-000002.png").is_file()
    quiet = runner.invoke(main, ["--quiet", *base, "--out", str(tmp_path / "b")])
    assert quiet.exit_code == 0 and "noiserefine:" not in quiet.output
    both = runner.invoke(main, ["-v", "-q", *base, "--out", str(tmp_path / "c")])
    assert both.exit_code == 2 and "exclude each other" in both.output
    bad = runner.invoke(main, [*base, "--validation-prompts", "a,,b", "--validation-every", "1", "--out", str(tmp_path / "d")])
    assert bad.exit_code == 2 and "empty prompt" in bad.output and not (tmp_path / "d").exists()


def test_library_code_does_not_print():
    """Library output goes through the `noiserefine` logger (or click.echo in the CLI), never print()."""
    printing = [str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
                if any(isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print"
                       for node in ast.walk(ast.parse(path.read_text())))]
    assert printing == []
