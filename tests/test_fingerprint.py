"""Model fingerprints (issue 14, item 4): a refiner, NPNet or target set made with a model in one
dtype is accepted by the same weights loaded in another; a model with one weight changed is refused;
records written before the dtype-free hashes existed (the shipped files) still match."""

from __future__ import annotations

import pytest
import torch
from sd_components import make_tiny_sd_pipe

from noiserefine.backbones.base import ROUNDED_HASHES, batch_timesteps, same_model
from noiserefine.backbones.shapes16 import Shapes16Backbone
from noiserefine.backbones.stable_diffusion import StableDiffusionBackbone
from noiserefine.errors import NoiseRefineError
from noiserefine.guidance import Guidance, Teacher
from noiserefine.io import read_json, shipped_path, write_json
from noiserefine.methods.golden import NPNet
from noiserefine.methods.refine import NoiseRefiner
from noiserefine.sampling import denoise, make_scheduler
from noiserefine.targets import TargetSpec, generate_targets
from noiserefine.train import TrainConfig, train_refiner

PROMPTS = ["a red circle", "a blue square"]


def _sd(dtype: torch.dtype = torch.float32, changed: bool = False) -> StableDiffusionBackbone:
    """The tiny SD model converted to `dtype` (as `from_pretrained(torch_dtype=...)` loads it);
    `changed`: one weight of the fp32 model moved first, by a step bf16 and fp16 both resolve."""
    pipe = make_tiny_sd_pipe()
    if changed:
        with torch.no_grad():
            pipe.unet.conv_in.weight[0, 0, 0, 0] += 0.05
    return StableDiffusionBackbone.from_pipeline(pipe.to(dtype), resolution=32)


@pytest.fixture(scope="module")
def fp32_refiner(tmp_path_factory):
    """A refiner trained (two MSD steps) on fp32 targets of the fp32 tiny SD model."""
    from accelerate.state import AcceleratorState

    root = tmp_path_factory.mktemp("fp32")
    backbone = _sd()
    spec = TargetSpec(PROMPTS, [0, 1], Teacher(Guidance(cfg=5.0), steps=2), shard_size=2)
    generate_targets(backbone, spec, root / "targets", batch_size=2, progress=False)
    AcceleratorState._reset_state(True)
    cfg = TrainConfig(steps=2, batch_size=2, lr=1e-2, msd_steps=2, rank=2, keep_fraction=1.0, checkpoint_every=10)
    path = train_refiner(backbone, root / "targets", root / "run", cfg, progress=False)
    AcceleratorState._reset_state(True)
    return path, backbone.fingerprint()


def test_fingerprint_keeps_its_exact_hash_and_adds_rounded_ones():
    fp = _sd().fingerprint()
    assert set(fp) == {"architecture", "weights_sha256", *ROUNDED_HASHES}
    assert fp["architecture"] == _sd(torch.bfloat16).fingerprint()["architecture"]  # the config hash knows no dtype


def test_same_weights_in_another_dtype_are_the_same_model():
    fp32, fp16, bf16 = (_sd(d).fingerprint() for d in (torch.float32, torch.float16, torch.bfloat16))
    assert fp32["weights_sha256"] != bf16["weights_sha256"] != fp16["weights_sha256"]  # the bytes differ
    assert same_model(fp32, bf16) and same_model(bf16, fp32)
    assert same_model(fp32, fp16) and same_model(fp16, fp32)
    # fp16 and bf16 roundings of fp32 weights disagree on ~6% of the bf16 values: no shared hash.
    assert not same_model(fp16, bf16)
    # Weights stored in fp16 (a variant="fp16" folder) agree in bf16 whatever dtype loads them.
    stored = [StableDiffusionBackbone.from_pipeline(make_tiny_sd_pipe().to(torch.float16).to(dtype), resolution=32)
              for dtype in (torch.float16, torch.bfloat16, torch.float32)]
    assert same_model(stored[0].fingerprint(), stored[1].fingerprint())
    assert same_model(stored[2].fingerprint(), stored[1].fingerprint())


def test_one_changed_weight_is_another_model_in_every_dtype():
    fp32 = _sd().fingerprint()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert not same_model(fp32, _sd(dtype, changed=True).fingerprint()), dtype


def test_records_without_rounded_hashes_compare_exact_bytes():
    fp32, bf16 = _sd().fingerprint(), _sd(torch.bfloat16).fingerprint()
    old = {"architecture": fp32["architecture"], "weights_sha256": fp32["weights_sha256"]}
    assert same_model(old, fp32) and same_model(fp32, old)
    assert not same_model(old, bf16)  # an old record cannot know the bf16 model is the same
    assert not same_model({**old, "architecture": "sd-unet-00000000"}, fp32)
    assert not same_model({"architecture": fp32["architecture"]}, {"architecture": fp32["architecture"]})


def test_fingerprint_follows_a_dtype_conversion():
    backbone = _sd()
    before = backbone.fingerprint()
    backbone.denoiser.to(torch.bfloat16)
    after = backbone.fingerprint()
    assert after["weights_sha256"] != before["weights_sha256"] and same_model(before, after)


def test_fp32_trained_refiner_samples_on_the_bf16_model(fp32_refiner):
    path, trained_on = fp32_refiner
    bf16 = _sd(torch.bfloat16)
    assert bf16.fingerprint() != trained_on
    refiner = NoiseRefiner.load(bf16, path)
    reference = NoiseRefiner.load(_sd(), path)
    x = torch.randn(2, *bf16.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond = bf16.encode_prompts(PROMPTS)
        refined = refiner(x, cond)
        want = reference(x, _sd().encode_prompts(PROMPTS))
        sample = denoise(bf16, make_scheduler("ddim", bf16.scheduler_config), refined, cond, steps=2)
    assert (want - x).abs().max() > 1e-4  # the refiner was trained: it moves the noise
    torch.testing.assert_close(refined.float(), want, atol=0.05, rtol=0.0)
    assert torch.isfinite(sample).all()
    NoiseRefiner.load(_sd(torch.float16), path)  # fp16 too


def test_refiner_on_a_model_with_one_weight_changed_is_refused(fp32_refiner):
    path, _ = fp32_refiner
    with pytest.raises(NoiseRefineError, match="trained on .*pass force=True"):
        NoiseRefiner.load(_sd(torch.bfloat16, changed=True), path)
    assert isinstance(NoiseRefiner.load(_sd(torch.bfloat16, changed=True), path, force=True), NoiseRefiner)


def test_shipped_records_load_on_the_shipped_model_without_force():
    backbone = Shapes16Backbone.load()
    refiner = NoiseRefiner.load(backbone, shipped_path(backbone.shipped_weights["refined"]))
    npnet = NPNet.load(backbone, shipped_path(backbone.shipped_weights["golden"]))
    # both were trained after the rounded hashes existed (records without them: see above)
    assert refiner.meta["base"] == npnet.meta["base"] == backbone.fingerprint()
    with pytest.raises(NoiseRefineError, match="trained on"):
        NoiseRefiner.load(backbone.guide, shipped_path(backbone.shipped_weights["refined"]))


def test_a_target_folder_resumes_under_an_old_record_of_the_same_model(tmp_path):
    backbone, out = _sd(), tmp_path / "targets"
    spec = TargetSpec(PROMPTS, [0, 1], Teacher(Guidance(cfg=5.0), steps=1), shard_size=2)
    generate_targets(backbone, spec, out, batch_size=2, progress=False)
    manifest = read_json(out / "manifest.json")
    old = {key: manifest["base"][key] for key in ("architecture", "weights_sha256")}  # as written before
    write_json(out / "manifest.json", {**manifest, "base": old})
    generate_targets(backbone, spec, out, batch_size=2, progress=False)  # the same model: resumes
    with pytest.raises(NoiseRefineError, match="another spec or base model"):
        generate_targets(_sd(changed=True), spec, out, batch_size=2, progress=False)


def test_batch_timesteps_gives_one_timestep_per_sample():
    x = torch.zeros(3, 1)
    for t in (999, torch.tensor(999), torch.tensor([999])):
        assert torch.equal(batch_timesteps(t, x), torch.full((3,), 999))
    per_sample = torch.tensor([1, 2, 3])
    assert torch.equal(batch_timesteps(per_sample, x), per_sample)
