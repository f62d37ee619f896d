"""The shipped shapes16 judges: accuracy, differentiable prompt probability, input checks."""

import json

import numpy as np
import pytest
import torch

from noiserefine.errors import NoiseRefineError
from noiserefine.evaluation.judge import (
    ARCHITECTURES, Judge, attribute_accuracy, load_judge, load_judges, train_judge,
)
from noiserefine.io import save_tensors
from noiserefine.world.shapes16 import parse_prompt, random_prompts, render

TEST_SEED = 12345  # differs from the training, held-out and reference streams


@pytest.fixture(scope="module")
def judges() -> dict[str, Judge]:
    return load_judges()


def _renders(n: int, seed: int = TEST_SEED) -> tuple[torch.Tensor, list[str]]:
    rng = np.random.default_rng(seed)
    prompts = random_prompts(n, rng)
    return torch.from_numpy(render(prompts, rng)), [p.text for p in prompts]


@pytest.mark.parametrize("kind", list(ARCHITECTURES))
def test_shipped_judge_is_accurate_on_fresh_renders(judges, kind):
    images, prompts = _renders(2000)
    acc = attribute_accuracy(judges[kind], images, prompts)
    assert set(acc) == {"adherence", "acc_color", "acc_shape", "acc_position"}
    assert min(acc.values()) >= 0.99, acc


@pytest.mark.parametrize("kind", list(ARCHITECTURES))
def test_shipped_judge_tolerates_slight_noise(judges, kind):
    images, prompts = _renders(500)
    noisy = images + 0.1 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    assert attribute_accuracy(judges[kind], noisy, prompts)["adherence"] >= 0.95


def test_judges_have_different_architectures(judges):
    assert judges["primary"].feature_dim != judges["heldout"].feature_dim
    shapes = lambda j: {tuple(p.shape) for p in j.trunk.parameters()}  # noqa: E731
    assert shapes(judges["primary"]).isdisjoint(shapes(judges["heldout"]))


def test_predict_names_the_attributes(judges):
    rng = np.random.default_rng(0)
    image = torch.from_numpy(render([parse_prompt("a blue triangle on the bottom")], rng))
    for judge in judges.values():
        assert judge.predict(image) == {"color": ["blue"], "shape": ["triangle"], "position": ["bottom"]}


def test_prompt_probability_is_high_for_the_right_prompt_and_has_gradients(judges):
    images, prompts = _renders(8)
    opposite = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
    wrong = [p.rsplit(" ", 1)[0] + " " + opposite[p.split()[-1]] for p in prompts]
    for judge in judges.values():
        x = images.clone().requires_grad_(True)
        p = judge.prompt_probability(x, prompts)
        assert p.shape == (8,) and bool(((p > 0.9) & (p <= 1.0)).all())
        assert bool((judge.prompt_probability(images, wrong) < 0.1).all())
        p.sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("shape", [(3, 16, 16), (2, 1, 16, 16), (2, 3, 8, 8)])
def test_wrong_image_shape_is_an_error(judges, shape):
    with pytest.raises(NoiseRefineError, match=r"\(B, 3, 16, 16\)"):
        judges["primary"].features(torch.zeros(shape))


def test_prompt_errors(judges):
    images, prompts = _renders(2)
    with pytest.raises(NoiseRefineError, match="2 images but 1 prompts"):
        judges["primary"].prompt_probability(images, prompts[:1])
    with pytest.raises(NoiseRefineError, match="empty prompt"):
        judges["primary"].prompt_probability(images, [prompts[0], ""])
    with pytest.raises(NoiseRefineError, match="unknown word"):
        judges["primary"].prompt_probability(images, [prompts[0], "a red blob on the left"])


def test_load_errors(tmp_path):
    with pytest.raises(NoiseRefineError, match="unknown judge kind"):
        load_judge("clip")
    primary = tmp_path / "judge-primary.safetensors"
    save_tensors(primary, Judge("primary").state_dict())
    with pytest.raises(NoiseRefineError, match="not a 'heldout' judge"):
        load_judge("heldout", primary)
    primary.write_bytes(primary.read_bytes()[:100])
    with pytest.raises(NoiseRefineError, match="truncated"):
        load_judge("primary", primary)


def test_loaded_judge_is_frozen_and_in_eval_mode(judges):
    for judge in judges.values():
        assert not judge.training
        assert not any(p.requires_grad for p in judge.parameters())


def test_train_judge_writes_weights_and_config(tmp_path):
    path = train_judge("heldout", seed=3, steps=3, out=tmp_path / "judges")
    assert path == tmp_path / "judges" / "judge-heldout.safetensors"
    config = json.loads(path.with_suffix(".json").read_text())
    assert config["kind"] == "heldout" and config["seed"] == 3 and config["steps"] == 3
    assert set(config["heldout_accuracy"]) == {"adherence", "acc_color", "acc_shape", "acc_position"}
    torch.manual_seed(3)  # the initialisation train_judge starts from
    initial = Judge("heldout")
    assert not torch.equal(load_judge("heldout", path).heads["color"].weight, initial.heads["color"].weight)


def test_judge_training_resumes_after_a_kill_without_redoing_steps(tmp_path, monkeypatch):
    """A killed judge training resumes from its checkpoint (steps before it are not redone), ends
    with the uninterrupted run's weights, and every step trains at the recipe's rate: torch's
    CosineAnnealingLR over `steps`, as the shipped judges were trained (up to float rounding)."""
    import noiserefine.evaluation.judge as judge_module

    monkeypatch.setattr(judge_module, "CHECKPOINT_EVERY", 2)
    real_step, seen = judge_module._judge_step, []

    def recording(judge, opt, seed, step):
        if step == 3 and len(seen) == 3:
            raise KeyboardInterrupt  # the first "b" run dies before step 3, after the checkpoint of step 2
        seen.append((step, opt.param_groups[0]["lr"]))
        return real_step(judge, opt, seed, step)

    straight = train_judge("primary", seed=1, steps=5, out=tmp_path / "a")
    monkeypatch.setattr(judge_module, "_judge_step", recording)
    with pytest.raises(KeyboardInterrupt):
        train_judge("primary", seed=1, steps=5, out=tmp_path / "b")
    resumed = train_judge("primary", seed=1, steps=5, out=tmp_path / "b")
    assert [step for step, _ in seen] == [0, 1, 2, 2, 3, 4]
    a, b = load_judge("primary", straight).state_dict(), load_judge("primary", resumed).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    opt = torch.optim.AdamW(Judge("primary").parameters(), lr=2e-3)
    annealing, recipe = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5), []
    for _ in range(5):
        recipe.append(opt.param_groups[0]["lr"])
        opt.step()
        annealing.step()
    for step, lr in seen:
        assert lr == pytest.approx(recipe[step], rel=0, abs=1e-18), step
