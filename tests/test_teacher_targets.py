"""Every guidance as a teacher: targets of autoguidance alone, with CFG and with an interval, and
scale-conditioned teachers; the manifest and the refiner's card record the full teacher."""

from __future__ import annotations

import json

import pytest
import torch

from noiserefine.backbones.base import attach_guide
from noiserefine.backbones.shapes16 import Shapes16Backbone
from noiserefine.errors import NoiseRefineError
from noiserefine.generation import SamplingOptions, sample_from_noise
from noiserefine.guidance import Guidance, Teacher
from noiserefine.sampling import noise_for_seeds
from noiserefine.targets import TargetSpec, best_per_scale, generate_targets, load_targets

PROMPTS = ["a red circle on the left", "a blue square on the top"]


@pytest.fixture(scope="module")
def guided():
    return attach_guide(Shapes16Backbone.create(0), Shapes16Backbone.create(1))


@pytest.mark.parametrize("guidance", [Guidance(auto=3.0), Guidance(cfg=2.0, auto=2.0),
                                      Guidance(auto=3.0, start=0.5)], ids=["auto", "cfg+auto", "auto-interval"])
def test_a_target_is_the_teachers_guided_sample_of_its_seed(guided, guidance, tmp_path):
    teacher = Teacher(guidance, steps=3)
    generate_targets(guided, TargetSpec(PROMPTS, [4, 5, 6], teacher), tmp_path, progress=False)
    data = load_targets(tmp_path)
    x_T = noise_for_seeds([4, 5, 6], guided.latent_shape)
    expected = sample_from_noise(guided, x_T, [PROMPTS[0], PROMPTS[1], PROMPTS[0]], SamplingOptions(guidance, 3))
    torch.testing.assert_close(data.x_0[:], expected, rtol=0, atol=1e-5)
    unguided = sample_from_noise(guided, x_T, [PROMPTS[0], PROMPTS[1], PROMPTS[0]], SamplingOptions(steps=3))
    assert (data.x_0[:] - unguided).abs().max() > 1e-3  # the teacher's guidance is really applied
    record = json.loads((tmp_path / "manifest.json").read_text())["spec"]["teacher"]
    assert Teacher.from_record(record) == teacher and record["row"] == teacher.row()


def test_scale_conditioned_targets_take_the_scales_in_turn(guided, tmp_path):
    teacher = Teacher(Guidance(auto=2.0), steps=2, scale_field="auto", scales=(1.5, 2.0, 3.0, 4.0))
    generate_targets(guided, TargetSpec(PROMPTS, list(range(8)), teacher), tmp_path, progress=False)
    data = load_targets(tmp_path)
    # scale (i + i div P) mod S: each pass over the two prompts moves the scales on by one
    assert data.cfg.tolist() == [1.5, 2.0, 4.0, 1.5, 3.0, 4.0, 2.0, 3.0]
    x_T = noise_for_seeds([4], guided.latent_shape)
    expected = sample_from_noise(guided, x_T, [PROMPTS[0]], SamplingOptions(Guidance(auto=3.0), 2))
    torch.testing.assert_close(data.x_0[4:5], expected, rtol=0, atol=1e-5)


def test_every_prompt_meets_every_teacher_scale():
    """48 prompts and 4 scales: with scale i mod S each prompt would get one scale only."""
    prompts = [f"p{k}" for k in range(48)]
    teacher = Teacher(Guidance(auto=2.0), scale_field="auto", scales=(1.5, 2.0, 3.0, 4.0))
    spec = TargetSpec(prompts, list(range(48 * 4)), teacher)
    met = {(spec.pair(i)[0], spec.pair(i)[2]) for i in range(48 * 4)}
    assert len(met) == 48 * 4
    assert sorted(spec.pair(i)[2] for i in range(48)) == sorted([1.5, 2.0, 3.0, 4.0] * 12)


def test_autoguided_teacher_without_a_guide_is_refused(tmp_path):
    with pytest.raises(NoiseRefineError, match="needs a guide model"):
        generate_targets(Shapes16Backbone.create(0), TargetSpec(PROMPTS, [0], Teacher(Guidance(auto=2.0))),
                         tmp_path / "t", progress=False)


def test_old_teacher_records_read_as_they_were_made():
    old = {"cfg": [2.0], "pag": 0.0, "steps": 20, "scheduler": "ddim"}  # the shipped refiner's card
    assert Teacher.from_record(old) == Teacher(Guidance(cfg=2.0))
    conditioned = Teacher.from_record({"cfg": [1.5, 3.0], "pag": 0.0, "steps": 20, "scheduler": "ddim"})
    assert conditioned.conditioned and conditioned.scales == (1.5, 3.0) and conditioned.scale_field == "cfg"
    assert Teacher.from_record(Teacher(Guidance(cfg=2.5, pag=1.5, start=0.6), 10).to_record()).row() == \
        "gaussian@cfg2.5+pag1.5+start0.6+steps10"


def test_a_teacher_varies_one_known_field():
    with pytest.raises(NoiseRefineError, match="unknown guidance field"):
        Teacher(Guidance(cfg=2.0), scale_field="temperature", scales=(1.0, 2.0))
    with pytest.raises(NoiseRefineError, match="auto >= 1"):
        Teacher(Guidance(auto=2.0), scale_field="auto", scales=(0.5, 2.0))


def test_cli_targets_take_every_guidance_flag(tmp_path):
    """`targets --auto A --guide G --cfg 1.5,3`: a CFG-conditioned teacher with autoguidance."""
    from click.testing import CliRunner

    from noiserefine.cli import main

    model, guide, prompts = tmp_path / "m.safetensors", tmp_path / "g.safetensors", tmp_path / "p.txt"
    Shapes16Backbone.create(0).save(model)
    Shapes16Backbone.create(1).save(guide)
    prompts.write_text("\n".join(PROMPTS) + "\n")
    common = ["targets", "--prompt-file", str(prompts), "--seeds", "0-3", "--steps", "2", "--model", str(model),
              "--score", "none"]
    result = CliRunner().invoke(main, [*common, "--auto", "2", "--guide", str(guide), "--cfg", "1.5,3",
                                       "--out", str(tmp_path / "t")])
    assert result.exit_code == 0, result.output
    teacher = Teacher.from_record(json.loads((tmp_path / "t" / "manifest.json").read_text())["spec"]["teacher"])
    assert teacher == Teacher(Guidance(cfg=1.5, auto=2.0), steps=2, scale_field="cfg", scales=(1.5, 3.0))
    result = CliRunner().invoke(main, [*common, "--auto", "2,3", "--cfg", "1.5,3", "--guide", str(guide),
                                       "--out", str(tmp_path / "u")])
    assert result.exit_code == 2 and "at most one guidance scale" in result.output
    result = CliRunner().invoke(main, [*common, "--auto", "2", "--out", str(tmp_path / "v")])  # no guide
    assert result.exit_code == 2 and "needs a guide model" in result.output
    assert not (tmp_path / "u").exists() and not (tmp_path / "v").exists()


def test_score_filtering_keeps_each_teacher_scales_share():
    """Scale 1.5's targets score low: a global cut would drop all of them; per scale, half stay."""
    scale = torch.tensor([1.5, 4.0] * 4)
    score = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.2, 0.95, 0.0, 0.7])
    kept = best_per_scale(score, scale, 0.5)
    assert kept.tolist() == [1, 2, 4, 5]
    assert best_per_scale(score, torch.full((8,), 2.0), 0.5).tolist() == [1, 3, 5, 7]
