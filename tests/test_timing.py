"""Timing that survives a shared machine (issue 16, item 3): the interleaving schedule, CPU time
beside wall time, the load warning, quality figures that chunking leaves unchanged, and progress
bars that count images (and a search method's rounds)."""

from __future__ import annotations

import json
import time

import pytest
import torch

from noiserefine import generation
from noiserefine.errors import NoiseRefineError
from noiserefine.evaluation import bench, timing
from noiserefine.evaluation.bench import BenchSetup, _waves, format_table, parse_row, run_bench, run_rows
from noiserefine.evaluation.timing import MachineLoad, PeakRSS, chunk_bounds, schedule, torch_threads
from noiserefine.generation import SamplingOptions, generate_latents
from noiserefine.methods.noise_diffusion import NoiseDiffusion, NoiseDiffusionConfig
from noiserefine.methods.search import BestOfN

TIME_KEYS = {"sec_per_image", "cpu_sec_per_image", "ratio_to_cfg", "cpu_ratio_to_cfg", "peak_mem_mb", "rounds"}


@pytest.mark.parametrize("n, batch, rounds", [(1000, 250, 4), (1000, 100, 4), (300, 250, 4), (200, 250, 4),
                                              (7, 2, 3), (3, 250, 4), (1, 1, 1)])
def test_chunks_cover_each_image_once_and_split_between_batches_when_they_can(n, batch, rounds):
    chunks = chunk_bounds(n, batch, rounds)
    assert chunks[0][0] == 0 and chunks[-1][1] == n
    assert all(a < b for a, b in chunks) and all(b == c for (_, b), (c, _) in zip(chunks, chunks[1:]))
    assert len(chunks) == min(rounds, n)
    if -(-n // batch) >= rounds:  # enough batches: whole batches per chunk, as an unchunked run has them
        assert all(lo % batch == 0 for lo, _ in chunks)
    else:  # equal parts
        assert max(b - a for a, b in chunks) - min(b - a for a, b in chunks) <= 1


def test_schedule_runs_chunk_k_of_every_row_in_round_k_starting_one_row_later_each_round():
    order = schedule([4, 4, 2])
    assert order == [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (1, 0), (2, 0), (2, 1), (3, 0), (3, 1)]
    assert schedule([]) == []


def test_best_of_n_runs_after_the_noise_diffusion_row_it_takes_its_budget_from():
    rows = [parse_row(r) for r in ("gaussian", "noise-diffusion@n20", "gaussian@cfg2", "best-of-n@n20",
                                   "best-of-n@budget3")]
    assert _waves(rows) == [[0, 1, 2, 4], [3]]
    assert _waves([parse_row("best-of-n"), parse_row("gaussian")]) == [[0, 1]]  # no Noise Diffusion before it


class Recorder:
    """A Gaussian noise method that logs which row called it, on how many images, with how many
    torch threads."""

    name, extra_nfe = "gaussian", 0.0

    def __init__(self, tag: str, log: list) -> None:
        self.tag, self.log = tag, log

    def __call__(self, x_T: torch.Tensor, prompts) -> torch.Tensor:
        self.log.append((self.tag, len(x_T)))
        return x_T


def test_rows_are_timed_in_interleaved_rounds_with_process_cpu_time(tiny_shapes16):
    log: list = []
    specs = [parse_row("gaussian@steps2"), parse_row("gaussian@cfg2+steps2")]
    setup = BenchSetup(["a red circle on the left"] * 8, list(range(8)), batch_size=8)
    rows = run_rows(tiny_shapes16, specs, lambda spec, done: Recorder(spec.label, log), setup,
                    lambda images, prompts: {"mean": float(images.mean())}, rounds=4)
    a, b = (s.label for s in specs)
    assert log[:2] == [(a, 8), (b, 8)]  # warm-ups first, untimed
    assert log[2:] == [(a, 2), (b, 2), (b, 2), (a, 2), (a, 2), (b, 2), (b, 2), (a, 2)]
    for row in rows:
        assert row["rounds"] == 4 and row["n_images"] == 8
        assert 0 < row["cpu_sec_per_image"] and 0 < row["sec_per_image"]


def _quality(report: dict) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in report["rows"]]


def test_quality_figures_are_those_of_an_unchunked_run(tmp_path):
    """Chunks of whole batches hold the same images as one unchunked run, so every figure but the
    clock is identical, search statistics included."""
    rows = "gaussian@steps3,gaussian@cfg2+steps3,noise-diffusion@steps2+n4,best-of-n@steps2+n4"
    for rounds in (1, 4):
        run_bench(tmp_path / f"r{rounds}", n=8, batch_size=1, rows=rows, progress=False, rounds=rounds)
    one, four = (json.loads((tmp_path / f"r{r}" / "bench.json").read_text()) for r in (1, 4))
    assert [r["rounds"] for r in four["rows"]] == [4] * 4
    assert _quality(one) == _quality(four)
    assert four["meta"]["rounds"] == 4 and four["meta"]["torch_threads"] == timing.DEFAULT_THREADS


def test_smaller_chunks_than_batches_change_images_by_float_rounding_only(tiny_shapes16):
    """A row of fewer batches than rounds is sampled in smaller batches: its latents move by float
    rounding (~1e-6), which 8-bit images almost never show."""
    setup = BenchSetup(["a red circle on the left", "a blue square on the bottom"] * 8, list(range(16)), 16)
    spec = parse_row("gaussian@cfg2+steps4")
    images = {}
    for rounds in (1, 4):
        run = bench.RowRun.start(tiny_shapes16, spec, generation.GaussianNoise(), setup, rounds)
        for k in range(len(run.chunks)):
            run.run_chunk(k)
        images[rounds] = torch.cat(run.images)
    changed = images[1] != images[4]
    assert changed.float().mean() < 1e-3
    assert (images[1] - images[4]).abs().max() <= 2 / 255 + 1e-6  # at most one 8-bit level


def _table(load: MachineLoad) -> str:
    row = {"row": "gaussian (unguided)", "n_images": 4, "nfe_per_image": 20, "sec_per_image": 0.07,
           "cpu_sec_per_image": 0.06, "ratio_to_cfg": 0.5, "adherence": 0.75, "acc_color": 1.0, "acc_shape": 0.75,
           "acc_position": 1.0, "fd": 50.0, "peak_mem_mb": 100}
    meta = {"n": 4, "sampler": "ddim", "batch_size": 4, "torch_threads": 1, "device": "cpu", "rounds": 4,
            "reference_row": "gaussian (cfg2)", "load": load.to_record()}
    return format_table([row], meta)


def test_the_table_warns_when_other_work_loaded_the_machine():
    busy = MachineLoad(threads=1, cpus=2, before=(2.4, 2.0, 1.0), after=(3.1, 2.5, 1.2), seconds=120)
    assert busy.loaded and "Warning: the machine was loaded" in _table(busy)
    assert "| 60.00 ms |" in _table(busy)  # the CPU time column
    # after a long run, a load average of 1 is this bench's own thread: nothing else ran
    alone = MachineLoad(threads=1, cpus=2, before=(0.1, 0.1, 0.1), after=(1.0, 0.8, 0.4), seconds=600)
    assert alone.others < 0.2 and not alone.loaded and "Warning" not in _table(alone)
    one_more_job = MachineLoad(threads=1, cpus=2, before=(1.0, 1.0, 1.0), after=(2.0, 1.9, 1.5), seconds=600)
    assert not one_more_job.loaded  # two CPUs, two busy threads: no one waits
    assert MachineLoad(threads=2, cpus=2, before=(1.0, 1.0, 1.0), after=(3.0, 3.0, 3.0), seconds=600).loaded


def test_bench_records_the_load_and_threads_it_ran_with(tmp_path, monkeypatch):
    loads = iter([(5.0, 4.0, 3.0), (6.0, 5.0, 4.0)])
    monkeypatch.setattr(timing.os, "getloadavg", lambda: next(loads))
    seen = []
    real_run_chunk = bench.RowRun.run_chunk
    monkeypatch.setattr(bench.RowRun, "run_chunk",
                        lambda self, k: seen.append(torch.get_num_threads()) or real_run_chunk(self, k))
    before = torch.get_num_threads()
    md = run_bench(tmp_path, n=2, batch_size=2, rows="gaussian@steps1,gaussian@cfg2+steps1", progress=False,
                   threads=2, rounds=2)
    meta = json.loads((tmp_path / "bench.json").read_text())["meta"]
    assert set(seen) == {2} and torch.get_num_threads() == before  # set for the rows, then restored
    assert meta["torch_threads"] == 2 and meta["load"]["loadavg_before"] == [5.0, 4.0, 3.0]
    assert meta["load"]["loaded"] and "Warning: the machine was loaded" in md.read_text()


def test_thread_and_round_counts_below_one_are_refused(tmp_path):
    with pytest.raises(NoiseRefineError, match="threads >= 1"):
        run_bench(tmp_path / "b", n=2, rows="gaussian", threads=0)
    with pytest.raises(NoiseRefineError, match="rounds >= 1"):
        run_bench(tmp_path / "b", n=2, rows="gaussian", rounds=0)
    assert not (tmp_path / "b").exists()
    with pytest.raises(NoiseRefineError):
        with torch_threads(0):
            pass


@pytest.mark.parametrize("kernel_peak", [True, False])
def test_peak_rss_sees_a_transient_allocation(monkeypatch, kernel_peak):
    if not kernel_peak:  # where /proc/self/clear_refs cannot be written: sampled every 5 ms
        monkeypatch.setattr(timing, "_reset_high_water_mark", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with PeakRSS() as mem:
        block = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
        time.sleep(0.05)
        del block
    assert 56 < mem.extra_mb < 200


class BarLog:
    """A stand-in for tqdm that records its total, its updates and its notes."""

    made: list["BarLog"] = []

    def __init__(self, *args, total=None, disable=False, **kwargs) -> None:
        self.total, self.updates, self.notes, self.disable = total, [], [], disable
        BarLog.made.append(self)

    def __enter__(self) -> "BarLog":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def update(self, n: int) -> None:
        self.updates.append(n)

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.notes.append(text)

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_progress_counts_images_and_shows_search_rounds_and_steps(tiny_shapes16, monkeypatch):
    monkeypatch.setattr(generation, "tqdm", BarLog)
    BarLog.made = []
    prompts, seeds = ["a red circle on the left"] * 5, list(range(5))
    scorer = lambda images, p: images.mean((1, 2, 3)).sigmoid()  # differentiable, in (0, 1)
    sampling = SamplingOptions(steps=2, batch_size=2)
    generate_latents(tiny_shapes16, prompts, seeds, None, sampling, progress=True)
    nd = NoiseDiffusion(tiny_shapes16, scorer, NoiseDiffusionConfig(rounds=3, candidates=2, threshold=1.0), sampling)
    generate_latents(tiny_shapes16, prompts, seeds, nd, sampling, progress=True)
    generate_latents(tiny_shapes16, prompts, seeds, BestOfN(tiny_shapes16, scorer, 2, sampling), sampling, progress=True)
    plain, search, best = BarLog.made
    for bar in (plain, search, best):
        assert bar.total == 5 and bar.updates == [2, 2, 1]
    assert "step 2/2" in plain.notes
    assert "search round 3/3: 2 of 2 images searching" in search.notes
    assert "candidate 2/2" in best.notes


def test_bench_progress_counts_every_rows_images(monkeypatch, tiny_shapes16):
    monkeypatch.setattr(bench, "tqdm", BarLog)
    BarLog.made = []
    setup = BenchSetup(["a red circle on the left"] * 6, list(range(6)), batch_size=6)
    specs = [parse_row("gaussian@steps1"), parse_row("gaussian@steps1+n3")]
    run_rows(tiny_shapes16, specs, lambda spec, done: generation.GaussianNoise(), setup,
             lambda images, prompts: {}, rounds=3, progress=True)
    (bar,) = BarLog.made
    assert bar.total == 9 and sum(bar.updates) == 9 and len(bar.updates) == 6
    assert any(note.startswith("round 3/3 gaussian (unguided, 1 steps)") for note in bar.notes)


def test_sample_shows_the_samplers_steps_beside_its_count_of_images(tiny_shapes16, monkeypatch, tmp_path):
    from noiserefine import samples

    monkeypatch.setattr(samples, "tqdm", BarLog)
    BarLog.made = []
    rows = [{"file": f"{k}.png", "prompt": "a red circle on the left", "seed": k} for k in range(3)]
    samples.write_samples(tmp_path, tiny_shapes16, generation.GaussianNoise(), SamplingOptions(steps=2, batch_size=2),
                          rows, rows)
    (bar,) = BarLog.made
    assert bar.total == 3 and bar.updates == [2, 1] and "step 2/2" in bar.notes
