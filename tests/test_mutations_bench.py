"""`noiserefine bench` promises read off bench.json, from one tiny run on the shipped model:

- every row's time ratios (wall and CPU) are its time per image over the reference row's, not the
  inverse;
- best-of-N gets the scorer budget Noise Diffusion used earlier in the same run (its paper's
  equal-budget comparison), rounded; before any Noise Diffusion row it has its own default;
- search methods score what their row samples: their model evaluations follow the row's guidance.
"""

from __future__ import annotations

import json

import pytest

from noiserefine.evaluation.bench import run_bench

ROWS = ("gaussian@steps1,gaussian@cfg2+steps2,best-of-n@cfg2+steps1,noise-diffusion@cfg2+steps1+rounds3,"
        "best-of-n@cfg2+steps1")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    run_bench(out, n=2, batch_size=2, rows=ROWS, progress=False)
    return json.loads((out / "bench.json").read_text())


def _rows(bench, method):
    return [r for r in bench["rows"] if r["method"] == method]


def test_time_ratio_is_row_time_over_reference_time(bench):
    rows = bench["rows"]
    reference = next(r for r in rows if r["row"] == bench["meta"]["reference_row"])
    assert reference["row"] == "gaussian (cfg2, 2 steps)" and reference["ratio_to_cfg"] == 1.0
    for time, ratio in (("sec_per_image", "ratio_to_cfg"), ("cpu_sec_per_image", "cpu_ratio_to_cfg")):
        assert len({r[time] for r in rows}) == len(rows)  # distinct times: an inverted ratio shows
        for r in rows:
            assert r[ratio] == pytest.approx(r[time] / reference[time], rel=1e-9)


def test_best_of_n_gets_noise_diffusions_scorer_budget(bench):
    (nd,) = _rows(bench, "noise-diffusion")
    before, after = _rows(bench, "best-of-n")
    budget = max(1, round(nd["scorer_calls_per_image"]))
    assert after["scorer_calls_per_image"] == budget
    assert before["scorer_calls_per_image"] != budget  # its default: the budget above is not a coincidence


def test_search_rows_are_scored_with_the_rows_guidance(bench):
    before, after = _rows(bench, "best-of-n")
    cfg2_one_step = 2  # model evaluations of one CFG sampling in 1 step
    for r in (before, after):  # each candidate sampled and scored, then the chosen noise sampled
        assert r["nfe_per_image"] == pytest.approx((r["scorer_calls_per_image"] + 1) * cfg2_one_step)
    (nd,) = _rows(bench, "noise-diffusion")
    assert nd["method_nfe_per_image"] == pytest.approx(nd["scorer_calls_per_image"] * cfg2_one_step)
