"""Targets and refiner training: resumable without lost or repeated work, loss options."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from noiserefine.backbones.shapes16 import Shapes16Backbone
from noiserefine.checkpoint import read_checkpoint
from noiserefine.errors import NoiseRefineError
from noiserefine.guidance import Guidance, Teacher
from noiserefine.io import load_tensors
from noiserefine.methods.refiner_folder import read_folder
from noiserefine.targets import TargetSpec, generate_targets, load_targets
from noiserefine.train import TrainConfig, train_refiner
from noiserefine.world import ALL_PROMPTS

PROMPTS = list(ALL_PROMPTS[:3])


def spec(seeds=range(7), **guidance) -> TargetSpec:
    """The tests' target spec: teacher CFG 3 + PAG 1 in 2 steps (guidance fields overridable)."""
    teacher = Teacher(Guidance(**({"cfg": 3.0, "pag": 1.0} | guidance)), steps=2)
    return TargetSpec(PROMPTS, list(seeds), teacher, shard_size=3)


@pytest.fixture(scope="module")
def targets_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("t") / "targets"
    generate_targets(Shapes16Backbone.create(0), spec(), out, progress=False)
    return out


def test_targets_resume_after_a_kill_matches_one_run(targets_dir, tmp_path):
    out = tmp_path / "targets"
    bb = Shapes16Backbone.create(0)
    generate_targets(bb, spec(), out, shard_ids=[1], progress=False)  # "killed" after shard 1
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00001.safetensors"]
    (out / "shard-00002.safetensors.tmp").write_bytes(b"half a shard")  # a write cut by the kill
    mtime = (out / "shard-00001.safetensors").stat().st_mtime_ns
    generate_targets(bb, spec(), out, progress=False)
    assert (out / "shard-00001.safetensors").stat().st_mtime_ns == mtime  # not redone
    for k in range(3):
        a = load_tensors(out / f"shard-{k:05d}.safetensors")
        b = load_tensors(targets_dir / f"shard-{k:05d}.safetensors")
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5)


def test_targets_folder_refuses_another_spec(targets_dir):
    with pytest.raises(NoiseRefineError, match="another spec"):
        generate_targets(Shapes16Backbone.create(0), spec(pag=2.0), targets_dir, progress=False)


def test_targets_are_guided_samples_of_their_noise(targets_dir):
    data = load_targets(targets_dir)
    assert len(data) == 7 and data.prompts[:4] == [*PROMPTS, PROMPTS[0]]
    assert not torch.equal(data.x_0[:], data.x_T[:])


def test_keep_fraction_keeps_the_best_scores(targets_dir, tmp_path):
    data = load_targets(targets_dir, keep_fraction=1.0)
    assert torch.all(data.score == 0)  # no scorer: all ties, order kept
    with pytest.raises(NoiseRefineError, match="keep fraction"):
        load_targets(targets_dir, keep_fraction=0.0)


def _weights(path):
    return read_folder(path)[0]  # the refiner folder's weights, by the refiner's own names


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_training_resume_after_kill_equals_uninterrupted_run(targets_dir, tmp_path, monkeypatch, schedule):
    import noiserefine.train as train_module

    cfg = TrainConfig(steps=4, batch_size=4, msd_steps=2, rank=4, checkpoint_every=2, lr=1e-3, lr_schedule=schedule)
    full = train_refiner(Shapes16Backbone.create(0), targets_dir, tmp_path / "a", cfg, progress=False)
    real_step = train_module._train_step

    def killed_at_step_3(objective, opt, params, data, inv, cfg, step, acc):
        if step == 3:
            raise KeyboardInterrupt  # after the checkpoint of step 2, before step 3 is saved
        return real_step(objective, opt, params, data, inv, cfg, step, acc)

    monkeypatch.setattr(train_module, "_train_step", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_refiner(Shapes16Backbone.create(0), targets_dir, tmp_path / "b", cfg, progress=False)
    monkeypatch.setattr(train_module, "_train_step", real_step)
    resumed = train_refiner(Shapes16Backbone.create(0), targets_dir, tmp_path / "b", cfg, progress=False)
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys()
    moved = False
    for k in a:
        assert torch.equal(a[k], b[k]), k
        moved |= bool(a[k].abs().sum() > 0) and "delta_head" in k
    assert moved


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_learning_rates_follow_the_recipe_through_a_kill(targets_dir, tmp_path, monkeypatch, schedule):
    """Every step, uninterrupted or resumed, trains at the recipe's rate: lr, or the cosine decay
    lr (1 + cos(pi step / steps)) / 2 of the shipped recipes (up to float rounding)."""
    import noiserefine.train as train_module

    cfg = TrainConfig(steps=5, batch_size=2, msd_steps=1, rank=4, checkpoint_every=2, lr=1e-3, lr_schedule=schedule)
    real_step, seen = train_module._train_step, []

    def recording(objective, opt, params, data, inv, cfg, step, acc):
        if step == 3 and len(seen) == 3:
            raise KeyboardInterrupt  # the first run dies before step 3; its checkpoint is step 2's
        seen.append((step, opt.param_groups[0]["lr"]))
        return real_step(objective, opt, params, data, inv, cfg, step, acc)

    monkeypatch.setattr(train_module, "_train_step", recording)
    with pytest.raises(KeyboardInterrupt):
        train_refiner(Shapes16Backbone.create(0), targets_dir, tmp_path, cfg, progress=False)
    train_refiner(Shapes16Backbone.create(0), targets_dir, tmp_path, cfg, progress=False)
    assert [step for step, _ in seen] == [0, 1, 2, 2, 3, 4]
    for step, lr in seen:
        recipe = 1e-3 if schedule == "constant" else 1e-3 * 0.5 * (1 + math.cos(math.pi * step / 5))
        assert lr == pytest.approx(recipe, rel=0, abs=1e-18), step
    assert seen[2] == seen[3]  # step 2 redone after the kill, at the same rate


def test_resume_with_another_config_is_refused(targets_dir, tmp_path):
    cfg = dict(batch_size=4, msd_steps=2, rank=4, checkpoint_every=1)
    train_refiner(Shapes16Backbone.create(0), targets_dir, tmp_path / "r", TrainConfig(steps=1, **cfg), progress=False)
    with pytest.raises(NoiseRefineError, match="another configuration"):
        train_refiner(Shapes16Backbone.create(0), targets_dir, tmp_path / "r",
                      TrainConfig(steps=2, **{**cfg, "lr": 5e-4}), progress=False)


def test_targets_from_another_base_model_are_refused(targets_dir, tmp_path):
    with pytest.raises(NoiseRefineError, match="generated by"):
        train_refiner(Shapes16Backbone.create(3), targets_dir, tmp_path / "x", TrainConfig(steps=1, batch_size=2),
                      progress=False)


@pytest.mark.parametrize("loss", ["msd", "full", "noise"])
def test_every_loss_reduces_its_objective(targets_dir, tmp_path, loss):
    cfg = TrainConfig(steps=6, batch_size=7, msd_steps=2, rank=4, lr=3e-3, loss=loss, checkpoint_every=100)
    train_refiner(Shapes16Backbone.create(0), targets_dir, tmp_path / loss, cfg, progress=False)
    losses = read_checkpoint(tmp_path / loss / "checkpoint")["losses"]
    assert losses[-1] < losses[0]


def test_resume_with_another_architecture_is_a_clear_error(targets_dir, tmp_path):
    cfg = dict(batch_size=4, msd_steps=2, checkpoint_every=1)
    train_refiner(Shapes16Backbone.create(0), targets_dir, tmp_path / "r", TrainConfig(steps=1, rank=4, **cfg),
                  progress=False)
    with pytest.raises(NoiseRefineError, match="another configuration"):
        train_refiner(Shapes16Backbone.create(0), targets_dir, tmp_path / "r", TrainConfig(steps=2, rank=8, **cfg),
                      progress=False)



def test_several_target_folders_of_one_teacher(targets_dir, tmp_path):
    bb = Shapes16Backbone.create(0)
    more = tmp_path / "more"
    generate_targets(bb, spec([7, 8]), more, progress=False)
    data = load_targets([targets_dir, more])
    assert len(data) == 9 and data.prompts[7:] == PROMPTS[:2]
    other = tmp_path / "other"
    generate_targets(bb, spec([7], pag=2.0), other, progress=False)
    with pytest.raises(NoiseRefineError, match="another base model or teacher"):
        load_targets([targets_dir, other])


def test_interval_teacher_is_recorded_and_checked(targets_dir, tmp_path):
    bb = Shapes16Backbone.create(0)
    out = tmp_path / "interval"
    generate_targets(bb, spec([0, 1, 2], start=0.5), out, progress=False)
    assert not torch.allclose(load_targets(out).x_0[:], load_targets(targets_dir).x_0[:3])  # another teacher
    with pytest.raises(NoiseRefineError, match="another base model or teacher"):
        load_targets([targets_dir, out])
    train_refiner(bb, out, tmp_path / "r", TrainConfig(steps=1, rank=4, batch_size=2), progress=False)
    teacher = json.loads((tmp_path / "r" / "refiner" / "noiserefine.json").read_text())["config"]["teacher"]
    assert (teacher["guidance_start"], teacher["guidance_stop"]) == (0.5, 1.0)


def test_folder_from_before_guidance_intervals_still_resumes(targets_dir, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(targets_dir, old)
    record = json.loads((old / "manifest.json").read_text())  # the flat spec written before intervals
    record["spec"] = {"prompts": PROMPTS, "seeds": list(range(7)), "cfg": [3.0], "pag": 1.0, "steps": 2,
                      "scheduler": "ddim", "shard_size": 3, "score": "none"}
    (old / "manifest.json").write_text(json.dumps(record))
    generate_targets(Shapes16Backbone.create(0), spec(), old, progress=False)  # no "another spec"
    assert len(load_targets([targets_dir, old])) == 14  # and it counts as the same teacher
