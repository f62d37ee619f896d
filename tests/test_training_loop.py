"""The shared training loop: a killed run resumes with the uninterrupted run's learning rates and
weights, the diffusers schedules equal the formulas the trainers used before, Ctrl-C keeps the
checkpoint, and resuming into another schedule is refused."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from noiserefine.checkpoint import read_checkpoint
from noiserefine.errors import NoiseRefineError
from noiserefine.training_loop import LoopSettings, run_training_loop

STEPS, EVERY, LR = 10, 3, 0.1


class _Run:
    """A tiny trainer in the shape the loop expects: batches from generators seeded by the step."""

    def __init__(self, interrupt_at: int | None = None) -> None:
        torch.manual_seed(0)
        self.net = torch.nn.Linear(4, 1)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=LR)
        self.interrupt_at = interrupt_at
        self.lrs: dict[int, float] = {}

    def step(self, step: int) -> float:
        if step == self.interrupt_at:
            raise KeyboardInterrupt
        self.lrs[step] = self.opt.param_groups[0]["lr"]
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(8, 4, generator=gen)
        loss = (self.net(x) - x.sum(1, keepdim=True)).square().mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def run(self, folder, **settings):
        loop = LoopSettings(folder, settings.pop("steps", STEPS), checkpoint_every=EVERY, progress=False, **settings)
        return run_training_loop(loop, {"net": self.net}, self.opt, self.step)


@pytest.mark.parametrize("schedule", [dict(lr_schedule="constant"), dict(lr_schedule="cosine"),
                                      dict(lr_schedule="cosine", warmup_steps=4), dict(lr_schedule="linear")])
@pytest.mark.parametrize("killed_at", [1, 4, 6, 9])
def test_a_resumed_run_has_the_uninterrupted_learning_rates_and_weights(tmp_path, schedule, killed_at):
    straight = _Run()
    result = straight.run(tmp_path / "a", **schedule)
    assert sorted(straight.lrs) == list(range(STEPS)) and result.start == 0
    with pytest.raises(KeyboardInterrupt):
        _Run(interrupt_at=killed_at).run(tmp_path / "b", **schedule)
    resumed = _Run()  # a new process: fresh model and optimizer
    again = resumed.run(tmp_path / "b", **schedule)
    assert again.start == killed_at // EVERY * EVERY  # from the last checkpoint
    assert resumed.lrs == {k: v for k, v in straight.lrs.items() if k >= again.start}  # exactly, every step
    assert again.losses == result.losses
    for name, value in straight.net.state_dict().items():
        assert torch.equal(value, resumed.net.state_dict()[name]), name
    if schedule["lr_schedule"] != "constant":
        assert len(set(straight.lrs.values())) > 3  # the schedule moved


def test_the_schedules_equal_the_formulas_the_trainers_used(tmp_path):
    """Refiner and NPNet: lr (1 + cos(pi step / steps)) / 2; judge: torch's CosineAnnealingLR;
    base and the shipped refiner: constant. Equal up to float rounding (the shipped recipes)."""
    cosine, constant = _Run(), _Run()
    cosine.run(tmp_path / "cos", lr_schedule="cosine")
    constant.run(tmp_path / "const")
    by_formula = [LR * 0.5 * (1 + math.cos(math.pi * step / STEPS)) for step in range(STEPS)]
    opt = torch.optim.AdamW(torch.nn.Linear(1, 1).parameters(), lr=LR)
    annealing = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)
    by_torch = []
    for _ in range(STEPS):
        by_torch.append(opt.param_groups[0]["lr"])
        opt.step()
        annealing.step()
    for step in range(STEPS):
        assert cosine.lrs[step] == pytest.approx(by_formula[step], rel=0, abs=1e-15 * LR)
        assert cosine.lrs[step] == pytest.approx(by_torch[step], rel=0, abs=1e-15 * LR)
    assert list(constant.lrs.values()) == [LR] * STEPS


def test_ctrl_c_keeps_the_last_checkpoint_and_says_where(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "noiserefine.training_loop")
    with pytest.raises(KeyboardInterrupt):
        _Run(interrupt_at=5).run(tmp_path)
    assert read_checkpoint(tmp_path)["step"] == 3
    assert "interrupted at step 5 of 10; the checkpoint of step 3 is kept" in caplog.text
    assert str(tmp_path) in caplog.text


def test_resuming_into_another_learning_rate_sequence_is_refused(tmp_path):
    _Run().run(tmp_path / "cos", lr_schedule="cosine", steps=6)
    with pytest.raises(NoiseRefineError, match="schedule .*would change the rate"):
        _Run().run(tmp_path / "cos", lr_schedule="cosine", steps=12)  # cosine depends on the budget
    with pytest.raises(NoiseRefineError, match="schedule"):
        _Run().run(tmp_path / "cos", lr_schedule="linear", steps=6)
    _Run().run(tmp_path / "const", steps=6)
    assert _Run().run(tmp_path / "const", steps=12).start == 6  # constant: the budget may grow


def test_a_checkpoint_past_the_step_budget_is_refused(tmp_path):
    _Run().run(tmp_path, steps=6)
    with pytest.raises(NoiseRefineError, match="at step 6, past the 3 steps"):
        _Run().run(tmp_path, steps=3)


def test_another_configuration_is_refused(tmp_path):
    _Run().run(tmp_path, steps=3, config={"width": 4})
    with pytest.raises(NoiseRefineError, match="another configuration.*width 4 -> 8"):
        _Run().run(tmp_path, steps=6, config={"width": 8})


@pytest.mark.parametrize("bad", [dict(lr_schedule="cosine_annealing"), dict(lr_schedule="piecewise_constant"),
                                 dict(steps=0), dict(checkpoint_every=0), dict(warmup_steps=-1)])
def test_bad_settings_are_refused(tmp_path, bad):
    with pytest.raises(NoiseRefineError):
        LoopSettings(tmp_path, **{"steps": 5, **bad})
