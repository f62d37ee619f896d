"""The report's training ablations (Tab. 1, Fig. 3, Figs. 6/35/36, Tab. 15, Tab. 14): every item
under --quick gives a valid result with its pictures, a re-run recomputes nothing, and the parts
they are built from (contrasts and verdicts, the scratch refiner, the inversion-pair statistics,
the noise optimisation) do what they say."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import noiserefine.report.training_items as items
import noiserefine.report.training_runs as runs
from noiserefine.backbones.shapes16 import Shapes16Backbone
from noiserefine.guidance import Guidance, Teacher
from noiserefine.io import load_tensors
from noiserefine.report import inversion_pairs, noise_optimisation, scratch_refiner
from noiserefine.report.core import ITEMS, VERDICTS, ItemResult, ReportContext
from noiserefine.targets import TargetSpec, generate_targets, load_targets
from noiserefine.train import TrainConfig, _global_batch
from noiserefine.world.shapes16 import ALL_PROMPTS

KEYS = ("tab1", "fig3", "fig6", "tab15", "tab14")


def _run_all(out):
    ctx = ReportContext(out, quick=True)
    return {key: ITEMS[key].run(ctx) for key in KEYS}


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return out, _run_all(out)


def test_every_training_item_gives_a_valid_result_with_its_pictures(quick_report):
    out, results = quick_report
    for key, result in results.items():
        assert isinstance(result, ItemResult), key
        assert result.verdict in VERDICTS and result.why and result.ours, key
        assert result.figures, key
        for name in result.figures:
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", (key, name)
        assert result.table and all(row.keys() == result.table[0].keys() for row in result.table), key
        json.dumps(result.data)  # report.json keeps it


def test_a_second_run_recomputes_nothing(quick_report, monkeypatch):
    out, first = quick_report

    def must_not_run(*args, **kwargs):
        raise AssertionError("recomputed a cached result")

    for module, name in ((runs, "generate_targets"), (runs, "train_refiner"), (runs, "train_scratch"),
                         (runs, "_evaluate"), (items, "optimise_noise"), (items, "step_memory"),
                         (items, "inversion_pairs")):
        monkeypatch.setattr(module, name, must_not_run)
    monkeypatch.setattr(runs, "_FINISHED", set())  # as in a new process
    again = _run_all(out)
    for key in KEYS:
        assert (again[key].ours, again[key].verdict, again[key].table) == \
               (first[key].ours, first[key].verdict, first[key].table), key


# -- contrasts and verdicts -----------------------------------------------------------------------
def _record(correct, heldout_correct, fd, heldout_fd, teacher_mse, fd_se=1.0):
    return {"correct": correct, "heldout_correct": heldout_correct, "fd": fd, "heldout_fd": heldout_fd,
            "fd_se": fd_se, "heldout_fd_se": fd_se, "teacher_mse": teacher_mse,
            "teacher_mse_mean": float(np.mean(teacher_mse))}


def test_contrast_pairs_adherence_and_reads_a_lower_fd_as_better():
    a = _record([True] * 50, [True, False] * 25, fd=10.0, heldout_fd=30.0, teacher_mse=[0.01, 0.02] * 25)
    b = _record([True, False] * 25, [True, False] * 25, fd=20.0, heldout_fd=20.0, teacher_mse=[0.011, 0.022] * 25)
    c = {x["metric"]: x for x in items.contrast(a, b)}
    assert c["adherence"]["diff"] == pytest.approx(0.5) and c["adherence"]["better"]
    assert c["held-out adherence"]["diff"] == 0 and not (c["held-out adherence"]["better"] or c["held-out adherence"]["worse"])
    assert c["FD"]["better"] and not c["FD"]["worse"]  # 10 < 20 by 7 SE
    assert c["held-out FD"]["worse"]
    assert c["FD"]["se"] == pytest.approx(math.sqrt(2))
    assert c["MSE to the teacher's image"]["diff"] == pytest.approx(-0.0015)  # paired: a is nearer on every image
    assert c["MSE to the teacher's image"]["better"]


def test_verdicts_need_a_significant_gain_and_no_significant_loss():
    gain = {"metric": "adherence", "better": True, "worse": False}
    loss = {"metric": "FD", "better": False, "worse": True}
    tie = {"metric": "FD", "better": False, "worse": False}
    assert items.judged([gain, tie], "A", "B")[0] == "agrees"
    assert items.judged([gain, loss], "A", "B")[0] == "differs"
    verdict, why = items.judged([tie], "A", "B")
    assert verdict == "differs" and "no difference" in why


# -- the refiner from scratch ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_targets(tmp_path_factory):
    out = tmp_path_factory.mktemp("t") / "targets"
    spec = TargetSpec(list(ALL_PROMPTS[:3]), list(range(6)), Teacher(Guidance(cfg=3.0), steps=2), shard_size=3)
    generate_targets(Shapes16Backbone.create(0), spec, out, progress=False)
    return out


def test_scratch_refiner_starts_as_the_identity():
    bb = Shapes16Backbone.create(0)
    refiner = scratch_refiner.ScratchRefiner(bb)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(refiner(x, bb.encode_prompts(["a red circle on the left"] * 2)), x)
    assert sum(p.numel() for p in refiner.net.parameters()) == sum(p.numel() for p in bb.denoiser.parameters())


def test_scratch_batches_are_train_refiners_batches():
    cfg = TrainConfig(batch_size=5, seed=3)
    for step in range(4):
        assert np.array_equal(scratch_refiner.batch_indices(cfg, step, 17), _global_batch(cfg, step, 17))


def test_scratch_training_resumes_after_a_kill_as_one_run(tiny_targets, tmp_path, monkeypatch):
    cfg = TrainConfig(steps=3, batch_size=4, msd_steps=2, lr=1e-3, checkpoint_every=1)
    whole = scratch_refiner.train_scratch(Shapes16Backbone.create(0), tiny_targets, tmp_path / "a", cfg)
    real_step = scratch_refiner._step

    def killed_at_step_2(*args):
        if args[-1] == 2:
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(scratch_refiner, "_step", killed_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        scratch_refiner.train_scratch(Shapes16Backbone.create(0), tiny_targets, tmp_path / "b", cfg)
    assert not scratch_refiner.is_trained(tmp_path / "b")
    monkeypatch.setattr(scratch_refiner, "_step", real_step)
    resumed = scratch_refiner.train_scratch(Shapes16Backbone.create(0), tiny_targets, tmp_path / "b", cfg)
    a, b = load_tensors(whole / scratch_refiner.WEIGHTS), load_tensors(resumed / scratch_refiner.WEIGHTS)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["conv_out.weight"].abs().sum() > 0  # it learnt something


# -- Fig. 3 statistics ----------------------------------------------------------------------------
def test_white_noise_has_flat_power_and_a_low_pass_difference_is_found_low():
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(64, 3, 16, 16, generator=g)
    _, power = inversion_pairs.radial_power(torch.randn(64, 3, 16, 16, generator=g))
    assert np.allclose(power[1:], 1.0, atol=0.25)
    smooth = torch.nn.functional.interpolate(torch.randn(64, 3, 4, 4, generator=g), size=16, mode="bilinear")
    pairs = {"x_T": x_T, "inverted": x_T + 0.3 * smooth, "x_0": x_T, "reconstructed": x_T, "plain": x_T}
    s = inversion_pairs.pair_statistics(pairs)
    assert s["mean_abs_inversion"] < min(s["mean_abs_random"], s["mean_abs_mismatched"])
    assert s["low_share_inversion"] > 0.5 > max(s["low_share_random"], s["low_share_mismatched"])
    assert s["correlation"] > 0.9 > 0.1 > abs(s["correlation_mismatched"])
    assert s["closer_than_unpaired"] > 10 * s["closer_than_unpaired_se"]
    assert s["low_share_gain"] > 10 * s["low_share_gain_se"]
    assert s["low_share_random"] == pytest.approx(s["low_share_white"], abs=0.03)


# -- Figs. 6 / 35 / 36 ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_problem(tiny_targets):
    data = load_targets(tiny_targets)
    return Shapes16Backbone.create(0), data.x_T[:2], data.x_0[:2], data.prompts[:2]


def test_both_gradients_start_from_the_same_loss_and_record_every_state(tiny_problem):
    bb, x_T, x_0, prompts = tiny_problem
    msd = noise_optimisation.optimise_noise(bb, x_T, x_0, prompts, "msd", iterations=2, steps=3)
    full = noise_optimisation.optimise_noise(bb, x_T, x_0, prompts, "full", iterations=2, steps=3)
    assert msd["loss"][0] == pytest.approx(full["loss"][0], rel=1e-5)  # one forward pass, two backward passes
    assert msd["grad_norm"][0] != pytest.approx(full["grad_norm"][0])
    for run in (msd, full):
        assert len(run["state_grad_sq"][0]) == 3 + 1  # x_T and the state after each step
        # at x_0: dL/dx_0 = 2 (x_0 - target) / D per noise, so ||.||^2 = 4 / D * sum of the losses
        assert run["state_grad_sq"][0][-1] == pytest.approx(4 / x_T[0].numel() * sum(run["loss"][0]), rel=1e-4)


def test_msd_keeps_almost_nothing_for_backward_and_full_gradients_keep_activations(tiny_problem):
    bb, x_T, x_0, prompts = tiny_problem
    msd = noise_optimisation.step_memory(bb, x_T, x_0, prompts, "msd", steps=3)
    full = noise_optimisation.step_memory(bb, x_T, x_0, prompts, "full", steps=3)
    assert full["saved_for_backward_mb"] > 20 * max(msd["saved_for_backward_mb"], 1e-3)
