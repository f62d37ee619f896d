"""Plot a scale-conditioned refiner against its teacher's own curve (NoiseRefine Fig. 24) from one
`noiserefine bench` run that holds `refined@wW` rows (the bench adds each teacher row):

    noiserefine bench --split test --n 500 --rows refined@w1.5,refined@w2,refined@w3,refined@w4 \\
        --refiner src/noiserefine/weights/shapes16-refiner-scales --out runs/test-scales
    python scripts/plot_scale_curve.py runs/test-scales/bench.json docs/scale-conditioning.png
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def curves(rows: list[dict]) -> tuple[dict[float, dict], dict[float, dict]]:
    """Refined rows by their teacher scale, and the teacher rows they name, by the same scale."""
    by_name = {r["row"]: r for r in rows}
    refined = {r["teacher_scale"]: r for r in rows if r["method"] == "refined" and r.get("teacher_scale") is not None}
    if not refined:
        raise SystemExit("no refined@wW rows in this bench")
    teacher = {w: by_name[r["teacher_row"]] for w, r in refined.items()}
    return refined, teacher


def se(p: float, n: int) -> float:
    """Binomial standard error of an adherence."""
    return math.sqrt(p * (1 - p) / n)


def plot(bench: Path, out: Path) -> None:
    record = json.loads(bench.read_text())
    refined, teacher = curves(record["rows"])
    ws = sorted(refined)
    panels = [("adherence", "primary-judge adherence"), ("heldout_adherence", "held-out-judge adherence"),
              ("fd", "FD to real renders (lower is better)")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, label) in zip(axes, panels):
        for rows, name, style in ((teacher, "teacher: Gaussian noise + autoguidance w (40 NFE)", "s--"),
                                  (refined, "refined noise, unguided, conditioned on w (21 NFE)", "o-")):
            ys = [rows[w][key] for w in ws]
            err = [se(rows[w][key], rows[w]["n_images"]) for w in ws] if key != "fd" else None
            ax.errorbar(ws, ys, yerr=err, fmt=style, capsize=3, label=name)
        ax.set_xlabel("autoguidance scale w")
        ax.set_ylabel(label)
        ax.set_xticks(ws)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    n = refined[ws[0]]["n_images"]
    fig.suptitle(f"One scale-conditioned refiner vs its teacher at each scale ({record['meta'].get('split', '?')} "
                 f"split, {n} images per point, bars: 1 SE)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", type=Path, help="bench.json of a run with refined@wW rows")
    parser.add_argument("out", type=Path, help="PNG to write")
    args = parser.parse_args()
    plot(args.bench, args.out)


if __name__ == "__main__":
    main()
