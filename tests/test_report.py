"""`noiserefine report`: the quick report names every registered item with a valid verdict and
pictures that exist; a re-run reuses the cache and computes nothing; the folder policy (refuse,
--resume, --overwrite) on a stand-in item; the page escapes text; the shared measuring helpers."""

from __future__ import annotations

import json
import shutil
from html import escape
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from noiserefine.backbones.shapes16 import Shapes16Backbone
from noiserefine.cli import main
from noiserefine.errors import NoiseRefineError
from noiserefine.report import measure, page, run
from noiserefine.report.core import VERDICTS, ItemResult, ItemSpec, ReportContext
from noiserefine.report.items import load_items


class _Page(HTMLParser):
    """The <img> sources and <section> ids of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.sections: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.images.append(a["src"])
        elif tag == "section":
            self.sections.append(a["id"])


def _parse(path: Path) -> _Page:
    parsed = _Page()
    parsed.feed(path.read_text())
    return parsed


def _invoke(*args: object) -> None:
    result = CliRunner().invoke(main, ["report", *map(str, args)])
    assert result.exit_code == 0, result.output + repr(result.exception)


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> Path:
    """One `report --quick` run of every registered item (the expensive part of this module)."""
    out = tmp_path_factory.mktemp("report") / "quick"
    _invoke("--quick", "--out", out)
    return out


def test_quick_report_names_every_item_with_a_verdict_and_existing_pictures(quick: Path) -> None:
    specs = load_items()
    html = (quick / "index.html").read_text()
    parsed = _parse(quick / "index.html")
    assert parsed.sections == [s.key for s in specs]
    for spec in specs:
        assert escape(spec.title) in html
    assert parsed.images, "the page shows no picture"
    for src in parsed.images:
        assert (quick / src).is_file() and (quick / src).stat().st_size > 0, src
    report = json.loads((quick / "report.json").read_text())
    assert [i["key"] for i in report["items"]] == [s.key for s in specs]
    for entry in report["items"]:
        assert entry["verdict"] in VERDICTS and entry["why"] and entry["ours"] and entry["paper"], entry["key"]
        assert set(entry) >= {"key", "title", "paper", "ours", "verdict", "why", "table", "figures", "data", "seconds"}
    assert report["meta"]["quick"] and report["meta"]["split"] == "test"


def test_rerun_reuses_the_cache_and_computes_nothing(quick: Path, tmp_path: Path, monkeypatch) -> None:
    """A resumed run evaluates no denoiser and computes no cache entry; the page is rendered again."""
    out = tmp_path / "again"
    shutil.copytree(quick, out)
    (out / "index.html").unlink()  # as a killed run leaves it
    calls = []
    predict = Shapes16Backbone.predict
    monkeypatch.setattr(Shapes16Backbone, "predict", lambda self, *a, **k: calls.append(1) or predict(self, *a, **k))
    _invoke("--quick", "--resume", "--out", out)
    report = json.loads((out / "report.json").read_text())
    assert [i["key"] for i in report["items"] if i["computed"]] == []
    assert not calls, f"{len(calls)} denoiser evaluations in a resumed run"
    assert _parse(out / "index.html").sections == [s.key for s in load_items()]


# -- the folder policy, on a stand-in item ------------------------------------------------------------
@pytest.fixture
def stand_in(monkeypatch) -> list[int]:
    """The report runs one cheap item that caches one number; returns the list its computations
    append to."""
    computed: list[int] = []

    def compute() -> dict:
        computed.append(1)
        return {"value": 0.5}

    def run_item(ctx: ReportContext) -> ItemResult:
        value = ctx.cached_json("value", compute)["value"]
        return ItemResult(f"value {value}", "agrees", "a stand-in", table=[{"value": value}])

    monkeypatch.setattr(run, "load_items", lambda: [ItemSpec("stand-in", "A stand-in item", "claims 0.5", run_item)])
    return computed


def test_a_finished_report_is_refused_resumed_or_overwritten(tmp_path: Path, stand_in: list[int]) -> None:
    out = tmp_path / "r"
    _invoke("--out", out)
    (out / "notes.txt").write_text("mine\n")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    result = CliRunner().invoke(main, ["report", "--out", str(out)])
    assert result.exit_code == 2 and "already holds a report; pass --resume" in result.output
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    _invoke("--resume", "--out", out)
    assert stand_in == [1], "--resume recomputed a cached result"
    history = json.loads((out / "report.json").read_text())["meta"]["history"]
    assert [(r["command"].split(str(out))[-1], r["computed"]) for r in history] == [("", 1), (" --resume", 0)]
    assert "runs of this folder" in (out / "index.html").read_text()
    _invoke("--overwrite", "--out", out)
    assert len(json.loads((out / "report.json").read_text())["meta"]["history"]) == 1  # a new folder's history
    assert stand_in == [1, 1], "--overwrite kept the old cache"
    assert (out / "notes.txt").read_text() == "mine\n" and (out / "index.html").is_file()


def test_a_killed_run_resumes_only_when_told(tmp_path: Path, stand_in: list[int]) -> None:
    out = tmp_path / "r"
    _invoke("--out", out)
    (out / "index.html").unlink()
    (out / "report.json").unlink()
    result = CliRunner().invoke(main, ["report", "--out", str(out)])
    assert result.exit_code == 2 and "the cache of an unfinished report" in result.output
    assert not (out / "index.html").exists()
    _invoke("--resume", "--out", out)
    assert stand_in == [1] and (out / "index.html").is_file()


@pytest.mark.parametrize("args, message", [
    (["--resume", "--overwrite"], "pass one of them"),
    (["--resume", "--quick"], "made with quick=False, split=test; resume it with the same options"),
])
def test_bad_resumes_are_refused_before_anything_changes(tmp_path: Path, stand_in: list[int], args: list[str],
                                                         message: str) -> None:
    out = tmp_path / "r"
    _invoke("--out", out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    result = CliRunner().invoke(main, ["report", *args, "--out", str(out)])
    assert result.exit_code == 2 and message in result.output, result.output
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_failing_item_fails_the_report_naming_it_and_keeps_earlier_caches(tmp_path: Path, monkeypatch,
                                                                            stand_in: list[int]) -> None:
    good = run.load_items()[0]

    def broken(ctx: ReportContext) -> ItemResult:
        raise ZeroDivisionError("division by zero")

    def refused(ctx: ReportContext) -> ItemResult:
        raise NoiseRefineError("no such weights")

    out = tmp_path / "r"
    monkeypatch.setattr(run, "load_items", lambda: [good, ItemSpec("broken", "Broken", "-", broken)])
    with pytest.raises(run.ReportItemError, match="report item 'broken' .*ZeroDivisionError"):
        run.run_report(out)
    assert (out / "cache" / "value.json").is_file() and not (out / "index.html").exists()
    monkeypatch.setattr(run, "load_items", lambda: [good, ItemSpec("refused", "Refused", "-", refused)])
    result = CliRunner().invoke(main, ["report", "--resume", "--out", str(out)])
    assert result.exit_code == 2 and "error: report item 'refused' failed: no such weights" in result.output
    assert stand_in == [1]


def test_an_item_naming_a_figure_it_did_not_write_fails(tmp_path: Path, monkeypatch) -> None:
    def liar(ctx: ReportContext) -> ItemResult:
        return ItemResult("x", "agrees", "y", figures=["missing.png"])

    monkeypatch.setattr(run, "load_items", lambda: [ItemSpec("liar", "Liar", "-", liar)])
    with pytest.raises(run.ReportItemError, match="'liar' names figures it did not write: \\['missing.png'\\]"):
        run.run_report(tmp_path / "r")


# -- the page and the measuring helpers ---------------------------------------------------------------
def test_the_page_escapes_text_and_shows_each_part_of_an_item() -> None:
    meta = {"command": "noiserefine report --out r", "date": "2026-01-01T00:00:00+00:00", "commit": "abc",
            "split": "test", "quick": False, "seconds": 60.0, "machine": "2 CPUs", "verdicts": {"differs": 1}}
    entry = {"key": "tab9", "title": "Tab. 9: <b>bold</b>", "paper": "paper says 1.0",
             "ours": "ours <script>x</script>",
             "verdict": "differs", "why": "because", "table": [{"a": 1.23456, "b": "x"}], "figures": ["f.png"],
             "captions": {"f.png": "what f shows"},
             "data": {}, "seconds": 1.0, "computed": [], "reused": ["f.json"]}
    html = page.render(meta, [entry])
    assert "<script>" not in html and "&lt;script&gt;" in html and "&lt;b&gt;bold" in html
    for part in ('id="tab9"', "Paper:</span> paper says 1.0", "<th>a</th>", "<td>1.235</td>", 'src="f.png"',
                 'class="badge differs"', "because", '<a href="#tab9">', "Tab. 9, figure 1. what f shows"):
        assert part in html, part


def test_paired_difference_and_its_standard_error() -> None:
    a = {"correct": [1, 1, 0, 1]}
    b = {"correct": [0, 1, 0, 1, 1, 1]}  # only the first four images are shared
    d, err = measure.paired(a, b)
    assert d == pytest.approx(0.25) and err == pytest.approx(0.25)  # differences 1, 0, 0, 0: sd 0.5 / sqrt(4)
    assert measure.se(0.5, 100) == pytest.approx(0.05)


def test_closer_to_counts_images_nearer_the_goal_among_those_that_differ() -> None:
    start, goal = torch.zeros(3, 1, 2, 2), torch.ones(3, 1, 2, 2)
    goal[2] = 0  # the third noise's two images are the same: not counted
    images = torch.stack([torch.full((1, 2, 2), 0.9), torch.full((1, 2, 2), 0.2), torch.zeros(1, 2, 2)])
    assert measure.closer_to(images, start, goal) == pytest.approx(0.5)
