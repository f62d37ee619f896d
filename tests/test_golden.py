"""Golden Noise / NPNet: identity at init, own-prompt conditioning, any resolution, re-denoise
pair collection and filtering, resumable MSE training, save/load and the base-model check."""

import json
import shutil

import pytest
import torch

from noiserefine.backbones.shapes16 import Shapes16Backbone
from noiserefine.errors import NoiseRefineError
from noiserefine.methods import golden as golden_module
from noiserefine.methods import registry
from noiserefine.methods.golden import (NPNet, NPNetConfig, NPNetTrainConfig, GoldenNoise, RedenoiseSpec,
                                        collect_pairs, load_pairs, pooled_prompt_embedding, redenoise, train_npnet)
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

    real_step = golden_module._train_step

    def killed_at_step_3(*args):
        if args[-1] == 3:
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(golden_module, "_train_step", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_npnet(backbone, pairs, tmp_path / "resumed", cfg, progress=False)
    monkeypatch.setattr(golden_module, "_train_step", real_step)
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
    method = registry.build("golden", backbone, path=path)
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
    method = registry.build("golden", base)
    assert method.npnet.meta["base"] == base.fingerprint()
    x_T = noise_for_seeds([0, 1], (3, 16, 16))
    out = method(x_T, PROMPTS[:2])
    assert out.shape == x_T.shape and 0 < (out - x_T).std() < 0.2
