"""The report's transfer, Golden Noise and Noise Diffusion items (issue 15) and the switches they
need: the shifted world variant (only its palette differs, and the judges still read it), fine-tuning
with `train-base --init-from --world`, NPNet's ablation switches, Noise Diffusion's plain update,
and each item under --quick."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from noiserefine.backbones.shapes16 import Shapes16Backbone
from noiserefine.cli import main
from noiserefine.errors import NoiseRefineError
from noiserefine.evaluation.judge import attribute_accuracy, load_judges
from noiserefine.io import load_tensors, shipped_path
from noiserefine.methods.golden import NPNet, NPNetConfig
from noiserefine.methods.noise_diffusion import NoiseDiffusionConfig, noise_update, select_candidate
from noiserefine.npnet_pairs import RedenoiseSpec, collect_pairs, load_pairs
from noiserefine.report.core import ITEMS, ItemResult, ReportContext
from noiserefine.report.noise_diffusion_items import best_so_far
from noiserefine.train_base import BaseTrainConfig, train_base
from noiserefine.world.shapes16 import WORLD_VARIANTS, random_prompts, render

PROMPTS = ["a red circle on the left", "a blue square on the top", "a green triangle on the right",
           "a yellow circle on the bottom"]


# -- the shifted world ------------------------------------------------------------------------
def _renders(variant: str, n: int = 200, seed: int = 3) -> tuple[list, np.ndarray]:
    rng = np.random.default_rng(seed)
    prompts = random_prompts(n, rng)
    return prompts, render(prompts, rng, variant)


def test_shifted_world_repaints_the_same_scenes_and_nothing_else():
    prompts, original = _renders("original")
    _, shifted = _renders("shifted")
    to01 = lambda x: (x + 1) / 2  # noqa: E731
    for variant, images in (("original", original), ("shifted", shifted)):
        palette = WORLD_VARIANTS[variant]
        for k, p in enumerate(prompts[:50]):
            pixels = to01(images[k]).reshape(3, -1).T
            background = np.isclose(pixels, palette.background, atol=1e-6).all(1)
            shape = np.isclose(pixels, palette.colors[p.color], atol=1e-6).all(1)
            assert (background ^ shape).all(), f"{variant} image {k} has pixels of neither its background nor colour"
            if variant == "shifted":
                orig = to01(original[k]).reshape(3, -1).T
                assert (shape == np.isclose(orig, WORLD_VARIANTS["original"].colors[p.color], atol=1e-6).all(1)).all()
    assert not np.allclose(original, shifted)


def test_judges_still_read_the_shifted_world():
    prompts, images = _renders("shifted", n=500)
    for name, judge in load_judges().items():
        acc = attribute_accuracy(judge, torch.from_numpy(images), [p.text for p in prompts])
        assert acc["adherence"] >= 0.98, (name, acc)


def test_unknown_world_variant_is_refused():
    with pytest.raises(NoiseRefineError, match="unknown world variant 'sepia'"):
        render(random_prompts(1, np.random.default_rng(0)), np.random.default_rng(0), "sepia")
    with pytest.raises(NoiseRefineError, match="unknown world variant"):
        BaseTrainConfig(world="sepia")


# -- fine-tuning ------------------------------------------------------------------------------
def test_fine_tune_starts_from_the_shipped_base_on_the_shifted_world(tmp_path):
    tiny = dict(steps=1, batch_size=4, checkpoint_every=1)
    tuned = train_base(tmp_path / "ft", BaseTrainConfig(init_from="shipped", world="shifted", **tiny), progress=False)
    fresh = train_base(tmp_path / "fresh", BaseTrainConfig(world="shifted", **tiny), progress=False)
    shipped = load_tensors(shipped_path("shapes16-base.safetensors"))
    a, b = load_tensors(tuned), load_tensors(fresh)
    key = next(k for k in a if k.endswith("conv_in.weight"))
    step = (a[key] - shipped[key]).abs().max()
    assert 0 < step < 1e-2  # one small step away from the shipped weights
    assert (b[key] - shipped[key]).abs().max() > 10 * step  # a fresh init is nowhere near them
    with pytest.raises(NoiseRefineError, match="another configuration"):
        train_base(tmp_path / "ft", BaseTrainConfig(init_from="shipped", world="original", **tiny), progress=False)


def test_cli_fine_tune_bad_init_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(main, ["train-base", "--init-from", str(tmp_path / "none.safetensors"),
                                       "--world", "shifted", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "init-from" in lines[0]
    assert not (tmp_path / "r").exists()


# -- NPNet's ablation switches ----------------------------------------------------------------
def _nets() -> dict[str, NPNet]:
    nets = {}
    for name, switches in (("full", {}), ("no-svd", {"singular_values": False}), ("no-residual", {"residual": False})):
        torch.manual_seed(0)
        nets[name] = NPNet(NPNetConfig(3, 64, width=16, depth=1, heads=2, **switches)).eval()
    return nets


def test_ablation_switches_remove_exactly_their_branch():
    nets = _nets()
    count = {k: sum(p.numel() for p in n.parameters()) for k, n in nets.items()}
    assert count["full"] > count["no-svd"] and count["full"] > count["no-residual"]
    assert not any(k.startswith("singular.") for k in nets["no-svd"].state_dict())
    assert not any(k.startswith(("residual.", "beta")) for k in nets["no-residual"].state_dict())
    full = nets["full"]
    with torch.no_grad():  # trained-like: every head off zero
        for p in (full.singular.head.weight, full.residual.up.weight, full.inject.proj.weight):
            p.normal_(0, 0.3)
        full.alpha.fill_(1.0)
    for name in ("no-svd", "no-residual"):
        nets[name].load_state_dict({k: v for k, v in full.state_dict().items() if k in nets[name].state_dict()})
    x, emb = torch.randn(2, 3, 16, 16), torch.randn(2, 64)
    with torch.no_grad():
        out = {k: n(x, emb) for k, n in nets.items()}
        assert (out["full"] - out["no-svd"]).abs().max() > 1e-3
        assert (out["full"] - out["no-residual"]).abs().max() > 1e-3
        full.singular.head.weight.zero_()  # the singular values kept: the SVD branch gives x_T back
        torch.testing.assert_close(full(x, emb), nets["no-svd"](x, emb), atol=1e-4, rtol=0)
        full.residual.up.weight.zero_()
        full.residual.up.bias.zero_()
        nets["no-residual"].singular.head.weight.zero_()
        torch.testing.assert_close(full(x, emb), nets["no-residual"](x, emb), atol=1e-4, rtol=0)


def test_margin_none_keeps_every_pair(tmp_path):
    backbone = Shapes16Backbone.create(0).eval()
    red = lambda images, prompts: torch.sigmoid(images[:, 0].mean((1, 2)) - images[:, 1:].mean((1, 2, 3)))  # noqa: E731
    spec = RedenoiseSpec(prompts=PROMPTS, seeds=list(range(6)), grid_steps=4, filter_steps=2, shard_size=6, score="red")
    folder = collect_pairs(backbone, spec, tmp_path / "pairs", red, batch_size=6, progress=False)
    assert len(load_pairs(folder, margin=None)) == 6
    with pytest.raises(NoiseRefineError, match="no pair"):
        load_pairs(folder, margin=10.0)


# -- Noise Diffusion's update -----------------------------------------------------------------
def test_plain_update_shrinks_the_variance_and_the_preserving_one_does_not():
    gen = torch.Generator().manual_seed(0)
    z, s = torch.randn(4000, 3, 16, 16, generator=gen), torch.randn(4000, 3, 16, 16, generator=gen)
    gamma = torch.full((4000,), 0.5)
    assert abs(float(noise_update(z, s, gamma, "preserving").std()) - 1.0) < 0.01
    assert abs(float(noise_update(z, s, gamma, "linear").std()) - 0.5 ** 0.5) < 0.01
    torch.testing.assert_close(noise_update(z[:2], s[:2], gamma[:2], "linear"), 0.5 * z[:2] + 0.5 * s[:2])
    with pytest.raises(NoiseRefineError, match="unknown Noise Diffusion update"):
        NoiseDiffusionConfig(update="pgd")


def test_candidate_selection_follows_the_update_used():
    """v_i = z'_i - z: with z = 0 both updates point along sigma_i and the candidate aligned with the
    gradient wins; with z = 3, g = 0.5 (constant tensors, gradient 1: the criterion is 1 / v) the
    preserving update's v_i = -0.879 + 0.707 sigma_i prefers sigma = 2 (v 0.54, vs 1.95 for sigma =
    4) and the plain update's v_i = -1.5 + 0.5 sigma_i prefers sigma = 4 (v 0.5, vs -0.5)."""
    z = torch.zeros(1, 3, 16, 16)
    grad = torch.ones(1, 3, 16, 16)
    pool = torch.stack([-torch.ones(3, 16, 16), torch.ones(3, 16, 16)])[None]
    gamma = torch.tensor([0.3])
    for update in ("preserving", "linear"):
        torch.testing.assert_close(select_candidate(z, grad, pool, gamma, update), pool[0, 1:2])
    z = 3 * torch.ones(1, 3, 16, 16)
    pool = torch.stack([2 * torch.ones(3, 16, 16), 4 * torch.ones(3, 16, 16)])[None]
    torch.testing.assert_close(select_candidate(z, grad, pool, torch.tensor([0.5]), "preserving"), pool[0, :1])
    torch.testing.assert_close(select_candidate(z, grad, pool, torch.tensor([0.5]), "linear"), pool[0, 1:])


# -- the report's per-round trace -------------------------------------------------------------
def test_best_so_far_follows_the_early_stopped_images():
    img = lambda *v: torch.tensor(v, dtype=torch.float32)[:, None, None, None].expand(-1, 3, 16, 16)  # noqa: E731
    calls = [(img(1, 2, 3), torch.tensor([0.2, 0.95, 0.5])),   # image 1 stops (>= 0.9)
             (img(4, 5), torch.tensor([0.1, 0.7])),            # images 0 and 2
             (img(6, 7), torch.tensor([0.3, 0.6]))]
    trace = best_so_far(calls, 3, threshold=0.9)
    assert [round(c, 4) for c, _, _ in trace] == [1.0, round(5 / 3, 4), round(7 / 3, 4)]
    torch.testing.assert_close(trace[-1][2], torch.tensor([0.3, 0.95, 0.7]))
    assert [float(x[0, 0, 0]) for x in trace[-1][1]] == [6.0, 2.0, 5.0]
    everyone = best_so_far([(img(1, 2), torch.tensor([0.5, 0.1])), (img(3, 4), torch.tensor([0.4, 0.2]))], 2, None)
    assert [c for c, _, _ in everyone] == [1.0, 2.0]
    assert [float(x[0, 0, 0]) for x in everyone[-1][1]] == [1.0, 4.0]


# -- the items under --quick --------------------------------------------------------------------
@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    from noiserefine.report import golden_items, noise_diffusion_items, transfer_items  # noqa: F401 (register)

    ctx = ReportContext(tmp_path_factory.mktemp("report"), quick=True)
    return ctx, {key: ITEMS[key].run(ctx) for key in ("tab4", "golden", "noise-diffusion")}


@pytest.mark.parametrize("key", ["tab4", "golden", "noise-diffusion"])
def test_item_under_quick_is_a_valid_result_with_its_figures(quick_report, key):
    ctx, results = quick_report
    result = results[key]
    assert isinstance(result, ItemResult) and result.verdict in ("agrees", "differs", "not applicable")
    assert result.ours and result.why and result.table and result.figures
    assert len({tuple(row) for row in result.table}) == 1  # every row has the header's columns
    for name in result.figures:
        path = ctx.figure_path(name)
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_items_reuse_their_cache(quick_report):
    ctx, results = quick_report
    again = ITEMS["noise-diffusion"].run(ctx)
    assert again.ours == results["noise-diffusion"].ours
