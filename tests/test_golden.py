"""Golden Noise / NPNet: identity at init, own-prompt conditioning, any resolution, re-denoise
pair collection and filtering, resumable MSE training, save/load and the base-model check; the
`noiserefine golden pairs` / `golden train` commands (tiny sizes, resume after a kill, bad input)."""

import json
import shutil

import pytest
import torch

from noiserefine.backbones.base import same_model
from noiserefine.backbones.shapes16 import Shapes16Backbone
from noiserefine.errors import NoiseRefineError
from noiserefine import train_npnet as train_module
from noiserefine.methods import registry
from noiserefine.methods.golden import GoldenNoise, NPNet, NPNetConfig, pooled_prompt_embedding
from noiserefine.npnet_pairs import RedenoiseSpec, collect_pairs, load_pairs, redenoise
from noiserefine.train_npnet import NPNetTrainConfig, train_npnet
from noiserefine.sampling import noise_for_seeds

PROMPTS = ["a red circle on the left", "a blue square on the top", "a green triangle on the right",
           "a yellow circle on the bottom"]
TINY = dict(width=16, depth=1, heads=2, patch=2)


@pytest.fixture(scope="module")
def backbone():
    return Shapes16Backbone.create(0).eval()


def _trained_like(net: NPNet) -> NPNet:
    """Move every zero-initialised part off zero, as training would."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in (net.singular.head.weight, net.residual.up.weight, net.inject.proj.weight):
            p.normal_(0, 0.3)
        net.alpha.fill_(1.0)
    return net.eval()


def _score(images, prompts):
    """A toy pluggable score: how red the image is."""
    return torch.sigmoid(images[:, 0].mean((1, 2)) - images[:, 1:].mean((1, 2, 3)))


def test_npnet_is_the_identity_at_init_at_any_resolution():
    torch.manual_seed(0)
    for shape in [(3, 16, 16), (4, 8, 12)]:
        net = NPNet(NPNetConfig(channels=shape[0], text_dim=10, **TINY))
        x = torch.randn(2, *shape)
        out = net(x, torch.randn(2, 10))
        assert out.shape == x.shape
        assert (out - x).abs().max() < 1e-4
    with pytest.raises(NoiseRefineError, match="divisible by 2"):
        net(torch.randn(1, 4, 7, 8), torch.randn(1, 10))
    with pytest.raises(NoiseRefineError, match="one prompt embedding"):
        net(torch.randn(2, 4, 8, 8), torch.randn(1, 10))


def test_each_sample_is_conditioned_on_its_own_prompt(backbone):
    method = GoldenNoise(_trained_like(NPNet.for_backbone(backbone, **TINY)), backbone)
    x_T = noise_for_seeds([0, 1, 2, 3], (3, 16, 16))
    out = method(x_T, PROMPTS)
    swapped = method(x_T, [PROMPTS[1], PROMPTS[0], *PROMPTS[2:]])
    changed = (out - swapped).flatten(1).abs().amax(1)
    assert (changed[:2] > 1e-3).all() and (changed[2:] < 1e-5).all()
    # each output equals the same sample run alone with the prompt it was given
    alone = method(x_T[1:2], [PROMPTS[0]])
    assert torch.allclose(swapped[1], alone[0], atol=1e-5)


def test_pooled_embedding_needs_text_conditioning():
    with pytest.raises(NoiseRefineError, match="encoder_hidden_states"):
        pooled_prompt_embedding({"class_labels": torch.zeros(2, dtype=torch.long)})


def test_redenoise_moves_the_noise_and_depends_on_the_prompt(backbone):
    x_T = noise_for_seeds([0, 1], (3, 16, 16))
    uncond = backbone.encode_prompts(["", ""])
    a = redenoise(backbone, x_T, backbone.encode_prompts(PROMPTS[:2]), uncond, high_cfg=5, low_cfg=1, grid_steps=4)
    b = redenoise(backbone, x_T, backbone.encode_prompts(PROMPTS[2:]), uncond, high_cfg=5, low_cfg=1, grid_steps=4)
    assert a.shape == x_T.shape and 1e-3 < (a - x_T).std() < 0.5
    assert not torch.allclose(a, b)
    # the low (inversion) scale matters too: the model is queried where the inversion starts
    c = redenoise(backbone, x_T, backbone.encode_prompts(PROMPTS[:2]), uncond, high_cfg=5, low_cfg=0, grid_steps=4)
    assert (a - c).abs().max() > 1e-4


def _collect(backbone, out, seeds=range(6)):
    spec = RedenoiseSpec(prompts=PROMPTS, seeds=list(seeds), grid_steps=4, filter_steps=2, shard_size=4, score="red")
    return collect_pairs(backbone, spec, out, _score, batch_size=3, progress=False)


def test_pair_collection_resumes_and_filters_by_margin(backbone, tmp_path):
    folder = _collect(backbone, tmp_path / "pairs")
    first = (folder / "pairs-00000.safetensors").stat().st_mtime_ns
    (folder / "pairs-00001.safetensors").unlink()  # as if killed during the second shard
    _collect(backbone, folder)
    assert (folder / "pairs-00000.safetensors").stat().st_mtime_ns == first  # finished shard kept
    everything = load_pairs(folder, margin=-1.0)
    assert len(everything) == everything.collected == 6
    assert everything.prompts == [PROMPTS[i % 4] for i in range(6)]
    from noiserefine.io import load_tensors

    raw = {k: torch.cat([load_tensors(folder / f"pairs-0000{s}.safetensors")[k] for s in (0, 1)])
           for k in ("score_source", "score_target")}
    margin = float((raw["score_target"] - raw["score_source"]).median())
    kept = load_pairs(folder, margin=margin)
    assert len(kept) == int((raw["score_source"] + margin < raw["score_target"]).sum()) < 6
    with pytest.raises(NoiseRefineError, match="another spec"):
        _collect(backbone, folder, seeds=range(7))
    with pytest.raises(NoiseRefineError, match="no pair"):
        load_pairs(folder, margin=10.0)


def test_training_resumes_exactly_and_round_trips(backbone, tmp_path, monkeypatch):
    pairs = _collect(backbone, tmp_path / "pairs")
    cfg = NPNetTrainConfig(steps=4, batch_size=4, checkpoint_every=2, val_fraction=0.2, margin=-1.0,
                           width=16, depth=1, heads=2)
    full = train_npnet(backbone, pairs, tmp_path / "full", cfg, progress=False)

    real_step = train_module._train_step

    def killed_at_step_3(*args):
        if args[-1] == 3:
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(train_module, "_train_step", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_npnet(backbone, pairs, tmp_path / "resumed", cfg, progress=False)
    monkeypatch.setattr(train_module, "_train_step", real_step)
    resumed = train_npnet(backbone, pairs, tmp_path / "resumed", cfg, progress=False)

    a, b = NPNet.load(backbone, full), NPNet.load(backbone, resumed)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-6), name
    meta = json.loads(full.with_suffix(".json").read_text())
    assert meta["base"] == backbone.fingerprint() and meta["pairs_kept"] == 6 and meta["val_pairs"] == 1
    assert meta["redenoise"]["high_cfg"] == 3.0 and "seeds" not in meta["redenoise"]
    x_T, emb = noise_for_seeds([9], (3, 16, 16)), pooled_prompt_embedding(backbone.encode_prompts(PROMPTS[:1]))
    assert not torch.allclose(a(x_T, emb), x_T)  # training moved it off the identity
    with pytest.raises(NoiseRefineError, match="another configuration"):
        train_npnet(backbone, pairs, tmp_path / "full", NPNetTrainConfig(steps=4, lr=1.0, margin=-1.0), progress=False)


def test_save_load_round_trip_and_refusal_for_another_base(backbone, tmp_path):
    net = _trained_like(NPNet.for_backbone(backbone, **TINY))
    path = tmp_path / "npnet.safetensors"
    net.save(path, backbone.fingerprint())
    x_T = noise_for_seeds([0, 1, 2, 3], (3, 16, 16))
    method = registry.build("golden", registry.MethodContext(backbone, weights={"golden": path}))
    assert torch.equal(method(x_T, PROMPTS), GoldenNoise(net, backbone)(x_T, PROMPTS))
    other = Shapes16Backbone.create(1)
    with pytest.raises(NoiseRefineError, match="was trained on"):
        NPNet.load(other, path)
    assert isinstance(NPNet.load(other, path, force=True), NPNet)
    broken = tmp_path / "broken.safetensors"
    shutil.copy(path, broken)
    broken.with_suffix(".json").write_text(path.with_suffix(".json").read_text().replace('"width": 16', '"width": 32'))
    with pytest.raises(NoiseRefineError, match="does not fit"):
        NPNet.load(backbone, broken)


def test_shipped_npnet_fits_the_shipped_base_model():
    base = Shapes16Backbone.load()
    method = registry.build("golden", registry.MethodContext(base))
    assert same_model(method.npnet.meta["base"], base.fingerprint())
    x_T = noise_for_seeds([0, 1], (3, 16, 16))
    out = method(x_T, PROMPTS[:2])
    assert out.shape == x_T.shape and 0 < (out - x_T).std() < 0.2


# -- the command line: `noiserefine golden pairs` / `golden train` ------------------------------
TINY_PAIRS = ["--seeds", "0-5", "--grid-steps", "4", "--filter-steps", "2", "--shard-size", "4", "--batch-size", "3"]
TINY_TRAIN = ["--steps", "4", "--batch-size", "4", "--margin", "-1", "--val-fraction", "0.2", "--width", "16",
              "--depth", "1", "--heads", "2", "--checkpoint-every", "2"]


@pytest.fixture(scope="module")
def cli_pairs(tmp_path_factory):
    """A tiny pair folder made by the command line on the shipped model (judge-filtered)."""
    root = tmp_path_factory.mktemp("cli")
    (root / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    result = _cli("golden", "pairs", "--prompt-file", root / "p.txt", *TINY_PAIRS, "--out", root / "pairs")
    assert result.exit_code == 0, result.output
    return root


def _cli(*args):
    from click.testing import CliRunner

    from noiserefine.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_pairs_then_train_write_a_loadable_npnet(cli_pairs, tmp_path):
    pairs = load_pairs(cli_pairs / "pairs", margin=-1.0)
    assert pairs.collected == 6 and pairs.manifest["spec"]["score"] == "judge"
    assert pairs.manifest["spec"]["grid_steps"] == 4 and pairs.manifest["spec"]["high_cfg"] == 3.0
    result = _cli("golden", "train", "--pairs", cli_pairs / "pairs", *TINY_TRAIN, "--out", tmp_path / "npnet")
    assert result.exit_code == 0, result.output
    net = NPNet.load(Shapes16Backbone.load(), tmp_path / "npnet" / "npnet.safetensors")
    assert net.config.width == 16 and net.meta["training"]["steps"] == 4 and net.meta["pairs_collected"] == 6


def test_cli_pairs_resume_after_a_kill_and_make_only_what_was_lost(cli_pairs, tmp_path, monkeypatch):
    from noiserefine import npnet_pairs

    real, made = npnet_pairs._pair_batch, []

    def killed_at_the_third_batch(backbone, spec, idx, scorer):
        if len(made) == 2:
            raise KeyboardInterrupt
        made.append(list(idx))
        return real(backbone, spec, idx, scorer)

    monkeypatch.setattr(npnet_pairs, "_pair_batch", killed_at_the_third_batch)
    args = ["golden", "pairs", "--prompt-file", cli_pairs / "p.txt", *TINY_PAIRS, "--out", tmp_path / "pairs"]
    assert _cli(*args).exit_code == 1  # click's "Aborted!" on Ctrl-C
    assert made == [[0, 1, 2], [3]]  # shard 0 finished, shard 1 not begun
    made.clear()
    monkeypatch.setattr(npnet_pairs, "_pair_batch", lambda *a: made.append(a[2]) or real(*a))
    assert _cli(*args).exit_code == 0
    assert made == [[4, 5]]
    a, b = load_pairs(tmp_path / "pairs", margin=-1.0), load_pairs(cli_pairs / "pairs", margin=-1.0)
    assert torch.equal(a.source, b.source) and torch.allclose(a.target, b.target, atol=1e-6)


@pytest.mark.parametrize("args, message", [
    (["--high-cfg", "1", "--low-cfg", "3"], "needs high_cfg > low_cfg"),
    (["--grid-steps", "1"], "grid of >= 2 steps"),
    (["--filter-steps", "0"], "filter steps must be >= 1"),
    (["--shard-size", "0"], "shard size must be >= 1"),
    (["--batch-size", "0"], "batch size must be >= 1"),
    (["--seeds", "5-x"], "seeds must look like"),
    (["--score", "none"], "choose one with --score"),
    (["--score", "hps"], "unknown scorer 'hps'"),
    (["--prompt-file", "missing.txt"], "prompt file not found"),
    (["--prompt-file", "bad.txt"], "unknown word"),
])
def test_cli_pairs_bad_input_is_one_error_line_and_creates_nothing(tmp_path, args, message):
    (tmp_path / "p.txt").write_text("a red circle on the left\n")
    (tmp_path / "bad.txt").write_text("a purple circle on the left\n")
    options = {"--prompt-file": "p.txt", "--seeds": "0-3"} | dict(zip(args[::2], args[1::2]))
    options["--prompt-file"] = tmp_path / options["--prompt-file"]
    result = _cli("golden", "pairs", *[x for pair in options.items() for x in pair], "--out", tmp_path / "pairs")
    assert result.exit_code == 2, result.output
    assert "error: " in result.output and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "pairs").exists()


def test_cli_pairs_refuse_another_spec_unless_overwrite_and_a_bad_out(cli_pairs, tmp_path):
    folder = tmp_path / "pairs"
    shutil.copytree(cli_pairs / "pairs", folder)
    (folder / "notes.txt").write_text("mine")
    args = ["golden", "pairs", "--prompt-file", cli_pairs / "p.txt", *TINY_PAIRS, "--seeds", "0-2", "--high-cfg", "5"]
    result = _cli(*args, "--out", folder)
    assert result.exit_code == 2 and "holds pairs of another spec" in result.output
    assert len(load_pairs(folder, margin=-1.0)) == 6  # untouched
    assert _cli(*args, "--out", folder, "--overwrite").exit_code == 0
    replaced = load_pairs(folder, margin=-1.0)
    assert replaced.collected == 3 and replaced.manifest["spec"]["high_cfg"] == 5.0
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "notes.txt", "pairs-00000.safetensors"]
    result = _cli(*args, "--out", tmp_path / "a" / "b")
    assert result.exit_code == 2 and "parent folder of the output does not exist" in result.output
    result = _cli(*args, "--out", folder / "notes.txt")
    assert result.exit_code == 2 and "is a file" in result.output


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "steps >= 1"),
    (["--lr", "0"], "learning rate must be > 0"),
    (["--val-fraction", "1"], "val_fraction must be in [0, 1)"),
    (["--margin", "10"], "improves its score by the margin 10"),
    (["--pairs", "nowhere"], "pairs folder not found"),
])
def test_cli_train_bad_input_is_one_error_line_and_creates_nothing(cli_pairs, tmp_path, args, message):
    options = {"--pairs": cli_pairs / "pairs", "--steps": "4", "--margin": "-1"} | dict(zip(args[::2], args[1::2]))
    if options["--pairs"] == "nowhere":
        options["--pairs"] = tmp_path / "nowhere"
    result = _cli("golden", "train", *[x for pair in options.items() for x in pair], "--out", tmp_path / "npnet")
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "npnet").exists()


def test_cli_train_refuses_to_resume_another_recipe(cli_pairs, tmp_path):
    assert _cli("golden", "train", "--pairs", cli_pairs / "pairs", *TINY_TRAIN, "--out", tmp_path / "n").exit_code == 0
    result = _cli("golden", "train", "--pairs", cli_pairs / "pairs", *TINY_TRAIN, "--lr", "0.5", "--out", tmp_path / "n")
    assert result.exit_code == 2 and "another configuration" in result.output and "lr 0.001 -> 0.5" in result.output
    result = _cli("golden", "train", "--pairs", cli_pairs / "pairs", *TINY_TRAIN, "--lr", "0.5", "--out", tmp_path / "n",
                  "--overwrite")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "n" / "npnet.json").read_text())["training"]["lr"] == 0.5
