"""Every error a user can cause ends as one `error: ...` line and exit status 2 (issue 16, item 2).

A table of bad inputs across the commands, typed as a new user would. Each case runs in a fresh
copy of a small workspace (prompt files, a plain file, folders holding earlier results of each
command, broken eval folders) and asserts: status 2, one `error:` line matching the message, no
traceback, and the workspace byte for byte as before -- nothing destroyed, no folder left behind.
Each case is the cheapest command that reaches its error (one seed, one step, tiny n).

After the table: the output-folder policy itself (`io.OutputFolder`): resume, --overwrite, and
that unrelated files in a folder are never results.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from noiserefine.cli import main
from noiserefine.errors import NoiseRefineError
from noiserefine.io import OutputFolder

PROMPT = "a red circle on the left"


@dataclass(frozen=True)
class Case:
    """`args`: the command line; `{ws}` is the workspace, `{new}` an output folder that does not
    exist yet (and must not exist after). `message`: a regex the `error:` line must match."""

    id: str
    args: str
    message: str


CASES = [
    # sample
    Case("sample-seeds-huge", "sample --prompt-file {ws}/p.txt --seeds 0-99999999999 --out {new}",
         r"seed range '0-99999999999' holds 100,000,000,000 seeds; at most 1,000,000"),
    Case("sample-seeds-garbled", "sample --prompt-file {ws}/p.txt --seeds a-b --out {new}",
         r"seeds must look like '0-99' or '1,5,9', got 'a-b'"),
    Case("sample-seeds-backwards", "sample --prompt-file {ws}/p.txt --seeds 5-3 --out {new}",
         r"seed range '5-3' is empty or negative"),
    Case("sample-out-is-file", "sample --prompt-file {ws}/p.txt --seeds 0 --steps 1 --out {ws}/afile",
         r"output .*afile is a file, not a folder"),
    Case("sample-out-parent-missing", "sample --prompt-file {ws}/p.txt --seeds 0 --steps 1 --out {ws}/no/out",
         r"parent folder of the output does not exist: .*/no$"),
    Case("sample-batch-size-0", "sample --prompt-file {ws}/p.txt --seeds 0 --steps 1 --batch-size 0 --out {new}",
         r"batch size >= 1, got steps=1, batch size 0"),
    Case("sample-steps-negative", "sample --prompt-file {ws}/p.txt --seeds 0 --steps -1 --out {new}",
         r"steps >= 1 .*got steps=-1"),
    Case("sample-cfg-nan", "sample --prompt-file {ws}/p.txt --seeds 0 --cfg nan --out {new}",
         r"--cfg must be a finite number, got nan"),
    Case("sample-strength-inf", "sample --prompt-file {ws}/p.txt --seeds 0 --method refined --strength inf --out {new}",
         r"--strength must be a finite number, got inf"),
    Case("sample-pag-negative", "sample --prompt-file {ws}/p.txt --seeds 0 --pag -1 --out {new}",
         r"pag >= 0"),
    Case("sample-interval-backwards",
         "sample --prompt-file {ws}/p.txt --seeds 0 --cfg 2 --guidance-start 0.9 --guidance-stop 0.1 --out {new}",
         r"guidance interval needs 0 <= start < stop <= 1"),
    Case("sample-refiner-with-gaussian",
         "sample --prompt-file {ws}/p.txt --seeds 0 --method gaussian --refiner {ws}/r.safetensors --out {new}",
         r"method 'gaussian' loads no weights file; --refiner applies to refined, golden"),
    Case("sample-refiner-missing",
         "sample --prompt-file {ws}/p.txt --seeds 0 --steps 1 --method refined --refiner {ws}/missing.safetensors "
         "--out {new}", r"^error: refiner not found: .*missing\.safetensors$"),
    Case("sample-npnet-missing",
         "sample --prompt-file {ws}/p.txt --seeds 0 --steps 1 --method golden --refiner {ws}/missing.safetensors "
         "--out {new}", r"^error: NPNet not found: .*missing\.safetensors$"),
    Case("sample-model-missing", "sample --prompt-file {ws}/p.txt --seeds 0 --model {ws}/m.safetensors --out {new}",
         r"weights file not found: .*m\.safetensors"),
    Case("sample-unknown-word", "sample --prompt-file {ws}/bad.txt --seeds 0 --steps 1 --out {new}",
         r"unknown word\(s\) \['purple'\]"),
    Case("sample-prompt-file-missing", "sample --prompt-file {ws}/none.txt --seeds 0 --out {new}",
         r"prompt file not found: .*none\.txt"),
    Case("sample-prompt-file-empty", "sample --prompt-file {ws}/empty.txt --seeds 0 --out {new}",
         r"prompt file .*empty\.txt has no prompts"),
    Case("sample-unknown-scheduler", "sample --prompt-file {ws}/p.txt --seeds 0 --steps 1 --scheduler foo --out {new}",
         r"unknown scheduler 'foo'"),
    Case("sample-teacher-scale-unconditioned",
         "sample --prompt-file {ws}/p.txt --seeds 0 --steps 1 --method refined --teacher-scale 3 --out {new}",
         r"this refiner is not guidance-scale conditioned: it takes no teacher scale, got 3"),
    Case("sample-option-of-another-method", "sample --prompt-file {ws}/p.txt --seeds 0 --budget 3 --out {new}",
         r"--budget do\(es\) not apply to --method gaussian"),
    Case("sample-best-of-n-budget-0",
         "sample --prompt-file {ws}/p.txt --seeds 0 --steps 1 --method best-of-n --budget 0 --out {new}",
         r"best-of-n needs n >= 1 candidates, got 0"),
    Case("sample-noise-diffusion-rounds-0",
         "sample --prompt-file {ws}/p.txt --seeds 0 --steps 1 --method noise-diffusion --rounds 0 --out {new}",
         r"rounds and candidates must be >= 1, got 0"),
    Case("sample-other-settings", "sample --prompt-file {ws}/p.txt --seeds 0-1 --steps 2 --out {ws}/samples",
         r"samples holds samples made with other settings \(steps 1, not 2\); pass --overwrite"),
    Case("sample-other-seeds", "sample --prompt-file {ws}/p2.txt --seeds 0-1 --steps 1 --out {ws}/samples",
         r"samples holds samples of other prompts or seeds"),
    Case("sample-images-without-manifest", "sample --prompt-file {ws}/p.txt --seeds 0 --steps 1 --out {ws}/pngs",
         r"pngs already holds results \(00000_seed0\.png\); pass --overwrite"),
    Case("sample-broken-manifest", "sample --prompt-file {ws}/p.txt --seeds 0 --steps 1 --out {ws}/eval-badjson",
         r"manifest\.jsonl line 1 is not a manifest row; pass --overwrite"),
    # eval
    Case("eval-truncated-png", "eval {ws}/eval-truncated", r"b\.png is not a readable image \(.*truncated"),
    Case("eval-not-an-image", "eval {ws}/eval-notimage", r"b\.png is not a readable image \(cannot identify"),
    Case("eval-missing-folder", "eval {ws}/nowhere", r"image folder not found: .*nowhere"),
    Case("eval-bad-json", "eval {ws}/eval-badjson", r"manifest\.jsonl line 1 is not valid JSON"),
    Case("eval-prompt-not-text", "eval {ws}/eval-prompt-number", r"line 1: file and prompt must be text, got 'a.png' and 5"),
    Case("eval-guidance-not-a-number", "eval {ws}/eval-cfg-text",
         r"line 1 has a bad guidance record \(could not convert string to float: 'x'\)"),
    Case("eval-missing-image", "eval {ws}/eval-missing", r"image file not found: .*b\.png"),
    # targets
    Case("targets-steps-0", "targets --prompt-file {ws}/p.txt --seeds 0-1 --steps 0 --out {new}",
         r"the teacher needs steps >= 1, got 0"),
    Case("targets-batch-size-0", "targets --prompt-file {ws}/p.txt --seeds 0-1 --steps 1 --batch-size 0 --out {new}",
         r"batch size and shard size must be >= 1, got 0 and 256"),
    Case("targets-shard-size-0", "targets --prompt-file {ws}/p.txt --seeds 0-1 --steps 1 --shard-size 0 --out {new}",
         r"batch size and shard size must be >= 1, got 64 and 0"),
    Case("targets-cfg-garbled", "targets --prompt-file {ws}/p.txt --seeds 0-1 --cfg 2,x --out {new}",
         r"expected numbers like 2 or 1.5,3,5, got '2,x'"),
    Case("targets-two-lists", "targets --prompt-file {ws}/p.txt --seeds 0-1 --cfg 2,3 --pag 1,2 --out {new}",
         r"a teacher varies at most one guidance scale"),
    Case("targets-unknown-word", "targets --prompt-file {ws}/bad.txt --seeds 0-1 --steps 1 --out {new}",
         r"unknown word\(s\) \['purple'\]"),
    Case("targets-unknown-scheduler", "targets --prompt-file {ws}/p.txt --seeds 0-1 --steps 1 --scheduler foo --out {new}",
         r"unknown scheduler 'foo'"),
    Case("targets-unknown-score", "targets --prompt-file {ws}/p.txt --seeds 0-1 --steps 1 --score bogus --out {new}",
         r"unknown scorer 'bogus'"),
    Case("targets-out-is-file", "targets --prompt-file {ws}/p.txt --seeds 0-1 --steps 1 --out {ws}/afile",
         r"output .*afile is a file, not a folder"),
    Case("targets-seeds-huge", "targets --prompt-file {ws}/p.txt --seeds 0-99999999999 --out {new}",
         r"holds 100,000,000,000 seeds"),
    # train
    Case("train-targets-missing", "train --targets {ws}/missing --steps 1 --out {new}",
         r"targets folder not found: .*missing$"),
    Case("train-targets-not-targets", "train --targets {ws}/bench --steps 1 --out {new}",
         r"bench holds no targets \(manifest\.json missing\)"),
    Case("train-steps-0", "train --targets {ws}/missing --steps 0 --out {new}", r"steps >= 1"),
    Case("train-batch-size-0", "train --targets {ws}/missing --batch-size 0 --out {new}",
         r"batch_size, msd_steps and rank >= 1.*'batch_size': 0"),
    Case("train-rank-0", "train --targets {ws}/missing --rank 0 --out {new}", r"'rank': 0"),
    Case("train-lr-nan", "train --targets {ws}/missing --lr nan --out {new}", r"--lr must be a finite number, got nan"),
    Case("train-keep-fraction-0", "train --targets {ws}/missing --keep-fraction 0 --out {new}",
         r"keep fraction must be in \(0, 1\], got 0"),
    Case("train-out-is-file", "train --targets {ws}/missing --out {ws}/afile", r"output .*afile is a file"),
    # bench
    Case("bench-n-0", "bench --n 0 --rows gaussian --out {new}", r"n \(images per row\) must be >= 1, got 0"),
    Case("bench-n-negative", "bench --n -1 --rows gaussian --out {new}", r"n \(images per row\) must be >= 1, got -1"),
    Case("bench-batch-size-0", "bench --n 2 --batch-size 0 --rows gaussian --out {new}",
         r"batch size must be >= 1, got 0"),
    Case("bench-bad-row-option", "bench --n 2 --rows gaussian@foo3 --out {new}", r"bad bench row option 'foo3'"),
    Case("bench-unknown-method", "bench --n 2 --rows nope --out {new}", r"unknown noise method 'nope'"),
    Case("bench-refiner-ignored", "bench --n 2 --rows gaussian --refiner {ws}/r.safetensors --out {new}",
         r"r\.safetensors would be ignored: no row of 'gaussian' is a 'refined' row"),
    Case("bench-prompt-file-missing", "bench --n 2 --rows gaussian --prompt-file {ws}/none.txt --out {new}",
         r"prompt file not found"),
    Case("bench-holds-results", "bench --n 2 --rows gaussian --out {ws}/bench",
         r"bench already holds results \(bench\.json, bench\.md\); pass --overwrite"),
    # demo
    Case("demo-n-0", "demo --n 0 --out {new}", r"n \(images per row\) must be >= 1, got 0"),
    Case("demo-holds-results", "demo --n 2 --out {ws}/demo", r"demo already holds results \(bench\.json, "),
    # report
    Case("report-holds-a-report", "report --out {ws}/report",
         r"report already holds a report; pass --resume to reuse its cache .*--overwrite to replace it"),
    Case("report-holds-a-cache", "report --quick --out {ws}/report-killed",
         r"report-killed already holds the cache of an unfinished report; pass --resume"),
    Case("report-resume-and-overwrite", "report --resume --overwrite --out {ws}/report", r"pass one of them"),
    Case("report-resume-other-size", "report --resume --quick --out {ws}/report",
         r"holds a report made with quick=False, split=test; resume it with the same options"),
    Case("report-out-is-file", "report --quick --out {ws}/afile", r"afile is a file, not a folder"),
    Case("report-parent-missing", "report --quick --out {ws}/no/report", r"parent folder of the output does not exist"),
    # world
    Case("world-export-n-negative", "world export --n -1 --out {new}", r"n >= 1 renders .*got n=-1"),
    Case("world-export-n-0", "world export --n 0 --out {new}", r"n >= 1 renders .*got n=0"),
    Case("world-export-seed-negative", "world export --n 1 --seed -1 --out {new}", r"seed >= 0, got n=1, seed=-1"),
    Case("world-export-holds-results", "world export --n 1 --out {ws}/export",
         r"export already holds results \(00000\.png, 00001\.png, labels\.jsonl\); pass --overwrite"),
    Case("world-export-out-is-file", "world export --n 1 --out {ws}/afile", r"afile is a file, not a folder"),
    # train-base
    Case("train-base-out-is-file", "train-base --steps 1 --out {ws}/afile", r"afile is a file, not a folder"),
    Case("train-base-steps-0", "train-base --steps 0 --out {new}", r"must be >= 1, got BaseTrainConfig\(steps=0"),
    Case("train-base-parent-missing", "train-base --steps 1 --out {ws}/no/run",
         r"parent folder of the output does not exist"),
]


def _write_eval_folder(folder: Path, png: Path, second: bytes | None, manifest: str | None = None) -> None:
    folder.mkdir()
    shutil.copy(png, folder / "a.png")
    if second is not None:
        (folder / "b.png").write_bytes(second)
    row = {"prompt": PROMPT, "seed": 0, "method": "gaussian", "cfg": 1.0, "pag": 0.0, "steps": 20}
    (folder / "manifest.jsonl").write_text(manifest if manifest is not None else "".join(
        json.dumps({"file": name, **row}) + "\n" for name in ("a.png", "b.png")))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Prompt files, a plain file, earlier results of each command, broken eval folders."""
    ws = tmp_path_factory.mktemp("ws")
    (ws / "p.txt").write_text(PROMPT + "\n")
    (ws / "p2.txt").write_text("a blue square on the top\n")
    (ws / "bad.txt").write_text("a purple circle on the left\n")
    (ws / "empty.txt").write_text("\n")
    (ws / "afile").write_text("not a folder\n")
    runner = CliRunner()
    for args in (f"sample --prompt-file {ws}/p.txt --seeds 0-1 --steps 1 --out {ws}/samples",
                 f"world export --n 2 --out {ws}/export"):
        assert runner.invoke(main, shlex.split(args)).exit_code == 0
    for folder, names in {"bench": ("bench.md", "bench.json"), "demo": ("grid.png", "bench.md", "bench.json"),
                          "pngs": ("00000_seed0.png",)}.items():
        (ws / folder).mkdir()
        for name in names:
            (ws / folder / name).write_text(f"an earlier {name}\n")
    for folder in ("report", "report-killed"):  # a full report, and the cache a killed one left
        (ws / folder / "cache").mkdir(parents=True)
        (ws / folder / "cache" / "settings.json").write_text(json.dumps({"quick": False, "split": "test"}))
    (ws / "report" / "index.html").write_text("an earlier page\n")
    png = ws / "export" / "00001.png"
    _write_eval_folder(ws / "eval-truncated", ws / "export" / "00000.png", png.read_bytes()[:60])
    _write_eval_folder(ws / "eval-notimage", ws / "export" / "00000.png", b"these are not PNG bytes\n")
    _write_eval_folder(ws / "eval-missing", ws / "export" / "00000.png", None)
    _write_eval_folder(ws / "eval-badjson", ws / "export" / "00000.png", png.read_bytes(), manifest="{not json\n")
    row = {"file": "a.png", "prompt": PROMPT, "seed": 0, "method": "gaussian", "steps": 20}
    for name, bad in {"eval-prompt-number": {"prompt": 5}, "eval-cfg-text": {"cfg": "x"}}.items():
        _write_eval_folder(ws / name, ws / "export" / "00000.png", png.read_bytes(),
                           manifest=json.dumps({**row, **bad}) + "\n" + json.dumps({**row, "file": "b.png"}) + "\n")
    return ws


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under `root`."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_error_line(case: Case, workspace: Path, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    shutil.copytree(workspace, ws)
    before = _snapshot(tmp_path)
    result = CliRunner().invoke(main, shlex.split(case.args.format(ws=ws, new=ws / "new")))
    output = result.output
    assert result.exit_code == 2, output
    assert "Traceback" not in output and isinstance(result.exception, SystemExit), output
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and output.rstrip().endswith(errors[0]), output
    assert re.search(case.message, errors[0]), f"{errors[0]!r} does not match {case.message!r}"
    assert _snapshot(tmp_path) == before, "the command changed the workspace (or left a folder behind)"


def test_the_table_covers_every_command_the_issue_names() -> None:
    commands = {c.args.split()[0] for c in CASES}
    assert len(CASES) >= 25
    assert {"sample", "eval", "targets", "train", "bench", "demo", "report", "world", "train-base"} <= commands


# -- the output-folder policy -------------------------------------------------------------------
def _run(*args: str) -> None:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output


def test_sample_resumes_a_folder_of_the_same_settings(tmp_path: Path) -> None:
    """A killed run (its manifest lists the first batch, a PNG of the second was written but not
    listed) resumes: listed images are kept untouched, the rest made as an uninterrupted run makes them."""
    (tmp_path / "p.txt").write_text(PROMPT + "\n")
    args = ("sample", "--prompt-file", tmp_path / "p.txt", "--seeds", "0-3", "--steps", "1", "--batch-size", "2")
    _run(*args, "--out", tmp_path / "full")
    out = tmp_path / "killed"
    shutil.copytree(tmp_path / "full", out)
    manifest = (out / "manifest.jsonl").read_text().splitlines(keepends=True)
    (out / "manifest.jsonl").write_text("".join(manifest[:2]))
    (out / "00003_seed3.png").unlink()
    (out / "00002_seed2.png").write_bytes(b"half a PNG")
    for name in ("00000_seed0.png", "00001_seed1.png"):
        os.utime(out / name, ns=(1_000_000_000, 1_000_000_000))
    _run(*args, "--out", out)
    assert _snapshot(out) == _snapshot(tmp_path / "full")
    assert all((out / f"0000{k}_seed{k}.png").stat().st_mtime_ns == 1_000_000_000 for k in (0, 1))  # not redone


def test_sample_overwrite_replaces_the_samples_and_keeps_other_files(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text(PROMPT + "\n")
    out = tmp_path / "out"
    _run("sample", "--prompt-file", tmp_path / "p.txt", "--seeds", "0-3", "--steps", "1", "--out", out)
    (out / "notes.txt").write_text("mine\n")
    _run("sample", "--prompt-file", tmp_path / "p.txt", "--seeds", "5", "--steps", "2", "--out", out, "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["00000_seed5.png", "manifest.jsonl", "notes.txt"]
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(r["seed"], r["steps"]) for r in rows] == [(5, 2)]


def test_world_export_overwrite_leaves_no_orphans(tmp_path: Path) -> None:
    _run("world", "export", "--n", "3", "--out", tmp_path / "w")
    _run("world", "export", "--n", "2", "--seed", "1", "--out", tmp_path / "w", "--overwrite")
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["00000.png", "00001.png", "labels.jsonl"]


def test_targets_resume_refuse_and_overwrite(tmp_path: Path) -> None:
    """targets into its own folder resumes (nothing rewritten); another spec is refused without
    touching the folder; --overwrite replaces it."""
    (tmp_path / "p.txt").write_text(PROMPT + "\n")
    out = tmp_path / "t"
    args = ["targets", "--prompt-file", tmp_path / "p.txt", "--seeds", "0-1", "--score", "none",
            "--batch-size", "2", "--out", out]
    _run(*args, "--steps", "1")
    before = _snapshot(out)
    _run(*args, "--steps", "1")
    assert _snapshot(out) == before
    refused = CliRunner().invoke(main, [str(a) for a in args] + ["--steps", "2"])
    assert refused.exit_code == 2 and "another spec" in refused.output
    assert _snapshot(out) == before
    _run(*args, "--steps", "2", "--overwrite")
    assert json.loads((out / "manifest.json").read_text())["spec"]["teacher"]["steps"] == 2


def test_output_folder_check_creates_nothing(tmp_path: Path) -> None:
    folder = OutputFolder(tmp_path / "new", ("*.md",)).check()
    assert not folder.path.exists()
    assert folder.open() == tmp_path / "new" and folder.path.is_dir()


def test_output_folder_counts_only_its_results(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a result")
    OutputFolder(tmp_path, ("bench.md",)).check()  # other files do not block
    (tmp_path / "bench.md").write_text("old")
    with pytest.raises(NoiseRefineError, match="already holds results \\(bench.md\\)"):
        OutputFolder(tmp_path, ("bench.md",)).check()
    OutputFolder(tmp_path, ("bench.md",), resume=True).check()  # a command that resumes may go on


def test_output_folder_overwrite_deletes_results_only_on_open(tmp_path: Path) -> None:
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "state.json").write_text("{}")
    (tmp_path / "refiner.json").write_text("{}")
    (tmp_path / "keep.txt").write_text("mine")
    folder = OutputFolder(tmp_path, ("checkpoint", "refiner.*"), overwrite=True).check()
    assert (tmp_path / "refiner.json").exists()  # check() deletes nothing
    folder.open()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
