"""Report items of NoiseRefine's section 5 / appendix A analyses on the shipped refiner, on the
split's prompts and seeds: size and frequency content of the refinement delta = x_hat_T - x_T
(Fig. 9, 16), which frequency bands carry its effect (Fig. 15, 17, 18), x0-predictions along the
trajectory (Fig. 11), strength (Fig. 13) and interpolation (Fig. 22).

Noises are sampled unguided with 20 DDIM steps unless said otherwise; "closer to the refined image"
is the share of images nearer to the refined noise's image than to the Gaussian noise's
(`measure.closer_to`), a measure of whether "the refined image emerges" (paper Fig. 15, 18).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable

import numpy as np
import torch

from noiserefine.analysis import PAIR_SEED_OFFSET, energy_below, keep_band, radial_power, slerp, x0_trajectory
from noiserefine.generation import SamplingOptions
from noiserefine.guidance import UNGUIDED, Guidance
from noiserefine.report import figures, measure
from noiserefine.report.core import ItemResult, ReportContext, item
from noiserefine.report.figures import Curve, Panel
from noiserefine.report.format import adherence, diff, fd

STEPS = 20

CAPTIONS = {
    "fig9a.png": ("Histogram of the absolute values of the refinement delta = x_hat_T - x_T and of the difference of "
                  "two independent Gaussian noises (Fig. 9a)."),
    "fig9b.png": ("Left: mean squared Fourier magnitude in rings of normalised radius (0 = DC, 1 = corner), log scale "
                  "(Fig. 9b). Right: share of the squared norm at radius <= the cutoff (Fig. 16); white noise grows "
                  "with the ring area."),
    "fig15.png": ("Left: adherence of x_T plus one 0.1-wide band of the refinement, both judges, with x_T alone and "
                  "the full refinement as lines. Right: share of images closer to the refined noise's image than to "
                  "the Gaussian noise's."),
    "fig17.png": ("Low (<= cutoff) or high (> cutoff) frequencies kept; the rest taken from x_T (only the delta's "
                  "band kept), zeroed (Fig. 17) or re-drawn from an independent Gaussian (Fig. 18). Left: adherence "
                  "(one SE); right: share of images closer to the refined image."),
    "fig17-images.png": ("The first prompts and seeds of the split: Gaussian and refined noise, then every band "
                         "variant."),
    "fig11.png": ("Share of x0-predictions in which the judge reads all three attributes of the prompt, at each of "
                  "the 20 DDIM steps."),
    "fig11-strips.png": ("x0-predictions along the trajectory for three prompts and seeds: Gaussian noise unguided, "
                         "Gaussian noise with the teacher's guidance, refined noise unguided."),
    "fig13.png": ("Adherence (one SE) and FD of x_T + s * delta sampled unguided, against s (s = 0: Gaussian noise, s "
                  "= 1: the refined noise)."),
    "fig13-images.png": "The same noise and prompt at growing strength s.",
    "fig22.png": ("Adherence along the slerp path between two Gaussian noises, sampled as they are or refined first "
                  "(t = 0 and 1 are the two ends)."),
    "fig22-images.png": "Each pair of rows: one prompt, the unrefined path above the refined one.",
}
"""The caption under each figure on the page."""


@dataclass
class Sweep:
    """The split's first n prompts and seeds, their Gaussian noise x_T, the refinement delta, an
    independent Gaussian x' and the images of x_T and x_T + delta, shared by the sweep items."""

    ctx: ReportContext
    n: int
    prompts: list[str]
    x_T: torch.Tensor
    delta: torch.Tensor
    other: torch.Tensor

    @classmethod
    def of(cls, ctx: ReportContext) -> "Sweep":
        n = ctx.n(200, 6)
        s = measure.setup(ctx, n)
        return cls(ctx, n, s.prompts, measure.gaussian(s.seeds), measure.refinement(ctx, n),
                   measure.gaussian([k + PAIR_SEED_OFFSET for k in s.seeds]))

    def images(self, name: str, noise: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Images of a noise variant (cached under `name` and n)."""
        return measure.sampled(self.ctx, f"sweep-{name}-n{self.n}", noise, self.prompts)

    @property
    def gaussian_images(self) -> torch.Tensor:
        return self.images("strength0", lambda: self.x_T)

    @property
    def refined_images(self) -> torch.Tensor:
        return self.images("strength1", lambda: self.x_T + self.delta)

    @cached_property
    def gaussian_scores(self) -> dict[str, Any]:
        return measure.score(self.gaussian_images, self.prompts)

    def measure(self, name: str, noise: Callable[[], torch.Tensor]) -> dict[str, Any]:
        """Scores of a variant, its paired change against x_T's images and the share of its images
        closer to the refined image than to the Gaussian one."""
        images = self.images(name, noise)
        rec = measure.score(images, self.prompts)
        return rec | {"vs_gaussian": measure.paired(rec, self.gaussian_scores),
                      "share": measure.closer_to(images, self.gaussian_images, self.refined_images),
                      "images": images}


def _variant_columns(rec: dict[str, Any]) -> dict[str, str]:
    """The table columns of a noise variant."""
    return {"adherence": adherence(rec), "held-out adherence": adherence(rec, "heldout"),
            "change vs x_T (paired)": diff(*rec["vs_gaussian"]), "FD / held-out FD": fd(rec),
            "closer to refined image": f"{rec['share']:.2f}"}


def _public(rec: dict[str, Any]) -> dict[str, Any]:
    """A variant's figures for report.json (no per-image verdicts or images)."""
    return {k: v for k, v in rec.items() if k not in ("correct", "heldout_correct", "images")}


# -- Fig. 9 and 16: size and frequency content ------------------------------------------------------
@item("fig9", "Fig. 9a/9b and 16: how large the refinement is, and at which frequencies",
      "The refinement is small and low-frequency: |x_hat_T - x_T| is concentrated at small values, unlike the "
      "difference of two Gaussian samples (Fig. 9a); its Fourier magnitude lies mainly at low frequencies (Fig. 9b); "
      "Fig. 16 plots its norm against the cutoff radius (SD2.1).")
def fig9(ctx: ReportContext) -> ItemResult:
    n = ctx.n(1000, 32)
    s = measure.setup(ctx, n)
    x_T, delta = measure.gaussian(s.seeds), measure.refinement(ctx, n)
    random_pair = x_T - measure.gaussian([k + PAIR_SEED_OFFSET for k in s.seeds])
    size, pair_size = float(delta.abs().mean()), float(random_pair.abs().mean())
    cutoffs = [round(c, 2) for c in np.linspace(0.05, 1.0, 20)]
    share_d, share_g = energy_below(delta, cutoffs), energy_below(x_T, cutoffs)
    low_d, low_g = energy_below(delta, [0.25])[0], energy_below(x_T, [0.25])[0]
    rings = radial_power(delta), radial_power(x_T)
    centres = [(b + 0.5) / len(rings[0]) for b in range(len(rings[0]))]
    figs = [figures.histogram(ctx.figure_path("fig9a.png", CAPTIONS["fig9a.png"]), {
                "|x_T - x'| (two independent Gaussians)": random_pair.abs().flatten().numpy(),
                "|x_hat_T - x_T| (the refinement)": delta.abs().flatten().numpy()},
                f"Fig. 9a: size of the change per value (n = {n} noises)", "absolute difference"),
            figures.line_panels(ctx.figure_path("fig9b.png", CAPTIONS["fig9b.png"]), [
                Panel("Fig. 9b: radial power spectrum", "normalised frequency radius (ring centre)",
                      "mean |FFT|^2", [Curve("refinement delta", centres, list(rings[0])),
                                       Curve("Gaussian noise x_T", centres, list(rings[1]), style="s--")], log_y=True),
                Panel("Fig. 16: energy below a cutoff radius", "cutoff radius", "share of squared norm",
                      [Curve("refinement delta", cutoffs, share_d), Curve("Gaussian noise x_T", cutoffs, share_g,
                                                                          style="s--")])],
                f"Where the refinement lives in frequency (n = {n} noises)")]
    agrees = size < pair_size and low_d >= 2 * low_g
    columns = ("refinement delta", "x_T - x' (two Gaussians)", "Gaussian x_T")
    signals = (delta, random_pair, x_T)
    quantities = {"mean |value|": lambda v: f"{float(v.abs().mean()):.3f}",
                  "share of energy at radius <= 0.25": lambda v: f"{energy_below(v, [0.25])[0]:.3f}",
                  "power ratio, lowest ring / highest ring": lambda v: f"{_ring_ratio(v):.1f}"}
    table = [{"quantity": q} | {c: f(v) for c, v in zip(columns, signals)} for q, f in quantities.items()]
    return ItemResult(
        ours=(f"Mean |delta| = {size:.3f} against {pair_size:.3f} between two independent Gaussians; {low_d:.0%} "
              f"of the refinement's energy lies at normalised radius <= 0.25 against {low_g:.0%} of white noise's; "
              f"n = {n} noises of the split."),
        verdict="agrees" if agrees else "differs",
        why=(f"The refinement is {size / pair_size:.2f}x the size of a random change and holds {low_d / low_g:.1f}x "
             f"white noise's share of low-frequency energy: small and low-frequency, as Fig. 9 shows." if agrees else
             f"The rule (smaller than a random change and at least twice white noise's low-frequency share) fails: "
             f"size ratio {size / pair_size:.2f}, low-frequency share {low_d:.2f} vs {low_g:.2f}."),
        table=table, figures=figs,
        data={"n": n, "mean_abs_delta": size, "mean_abs_random_pair": pair_size, "radial_power_delta": list(rings[0]),
              "radial_power_gaussian": list(rings[1]), "cutoffs": cutoffs, "energy_below_delta": share_d,
              "energy_below_gaussian": share_g})


def _ring_ratio(x: torch.Tensor) -> float:
    """Radial power of the lowest ring over that of the highest."""
    power = radial_power(x)
    return float(power[0] / power[-1])


# -- Fig. 15: one 0.1-wide band of the refinement at a time ------------------------------------------
BANDS = [(k / 10, (k + 1) / 10) for k in range(10)]


@item("fig15", "Fig. 15: one 0.1-wide frequency band of the refinement at a time",
      "Only the lowest band carries the effect: replacing the (0, 0.1) band of the initial noise by the refined "
      "noise's makes the refined image emerge, no other 0.1-wide band does (Fig. 15a; from a cutoff of 0.03 on, "
      "Fig. 15b; SD2.1, appendix A.2).")
def fig15(ctx: ReportContext) -> ItemResult:
    sweep = Sweep.of(ctx)
    recs = [sweep.measure(f"band{lo:g}-{hi:g}", lambda lo=lo, hi=hi: sweep.x_T + keep_band(sweep.delta, lo, hi))
            for lo, hi in BANDS]
    none = sweep.measure("strength0", lambda: sweep.x_T)
    full = sweep.measure("strength1", lambda: sweep.x_T + sweep.delta)
    labels = [f"({lo:.1f}, {hi:.1f}]" for lo, hi in BANDS]
    table = [{"x_T + band of delta": label} | _variant_columns(r)
             for label, r in [*zip(labels, recs), ("none (x_T)", none), ("all (x_hat_T)", full)]]
    best_share = int(np.argmax([r["share"] for r in recs]))
    best_gain = int(np.argmax([r["adherence"] for r in recs]))
    agrees = best_share == 0 and best_gain == 0
    low = recs[0]
    x = list(range(len(BANDS)))
    fig = figures.line_panels(ctx.figure_path("fig15.png", CAPTIONS["fig15.png"]), [
        Panel("adherence with one band of delta", "band of normalised radius", "adherence (± 1 SE)", [
            Curve("primary judge", x, [r["adherence"] for r in recs], [r["adherence_se"] for r in recs]),
            Curve("held-out judge", x, [r["heldout_adherence"] for r in recs],
                  [r["heldout_adherence_se"] for r in recs], "s-"),
            Curve(f"none (x_T): {none['adherence']:.3f}", x, [none["adherence"]] * len(x), style=":"),
            Curve(f"all (x_hat_T): {full['adherence']:.3f}", x, [full["adherence"]] * len(x), style="--")],
            xticks=list(zip(x, labels))),
        Panel("does the refined image appear?", "band of normalised radius", "share closer to the refined image", [
            Curve("x_T + band of delta", x, [r["share"] for r in recs])], xticks=list(zip(x, labels))),
    ], f"Fig. 15: x_T plus a single 0.1-wide band of the refinement (n = {sweep.n})")
    return ItemResult(
        ours=(f"The (0, 0.1] band alone gives adherence {adherence(low)} (held-out {adherence(low, 'heldout')}), a "
              f"change of {diff(*low['vs_gaussian'])} against x_T ({none['adherence']:.3f}), with "
              f"{low['share']:.2f} of its images closer to the refined image; the band with the highest adherence is "
              f"{labels[best_gain]} ({recs[best_gain]['adherence']:.3f}), the one with the most images closer to the "
              f"refined image {labels[best_share]} ({recs[best_share]['share']:.2f}); the whole refinement gives "
              f"{full['adherence']:.3f}; n = {sweep.n}."),
        verdict="agrees" if agrees else "differs",
        why=("The lowest band alone moves the image furthest towards the refined one and raises adherence most, as in "
             "the paper." if agrees else
             f"Here the lowest band is not what carries the effect alone: the most images closer to the refined image "
             f"come with band {labels[best_share]} and the highest adherence with band {labels[best_gain]}, while "
             f"the (0, 0.1] band changes adherence by {diff(*low['vs_gaussian'])} (the paper: only (0, 0.1) matters)."),
        table=table, figures=[fig],
        data={"n": sweep.n, "bands": labels, "bands_scores": [_public(r) for r in recs], "none": _public(none),
              "all": _public(full)})


# -- Fig. 17 / 18: keep a band, zero or re-draw the rest ---------------------------------------------
VARIANTS = ("delta", "zeroed", "re-drawn")


def _band_variant(sweep: Sweep, side: str, variant: str, c: float) -> torch.Tensor:
    """Noise that keeps the low (<= c) or high (> c) frequencies of the refinement: of the delta
    only (the rest of x_T stays), of the refined noise with the rest zeroed (Fig. 17), or of the
    refined noise with the rest re-drawn from an independent Gaussian (Fig. 18)."""
    kept, dropped = ((0.0, c), (c, 1.0)) if side == "low" else ((c, 1.0), (0.0, c))
    if variant == "delta":
        return sweep.x_T + keep_band(sweep.delta, *kept)
    refined = keep_band(sweep.x_T + sweep.delta, *kept)
    return refined if variant == "zeroed" else refined + keep_band(sweep.other, *dropped)


@item("fig17", "Fig. 17 / 18: keep the low or the high frequencies; zero or re-draw the rest",
      "Low frequencies carry the image: keeping only the low bands of the refined noise and zeroing the rest "
      "already forms the structure, high bands alone do not (Fig. 17); with the dropped bands re-drawn as fresh "
      "Gaussian noise, keeping the lower 10-20% reconstructs the refined image while the high bands alone fail "
      "(Fig. 18; SD2.1, DDIM 20 steps, unguided).")
def fig17(ctx: ReportContext) -> ItemResult:
    sweep = Sweep.of(ctx)
    cutoffs = (0.1, 0.25)
    recs = {(c, side, v): sweep.measure(f"{side}{c:g}-{v}",
                                        lambda c=c, side=side, v=v: _band_variant(sweep, side, v, c))
            for c in cutoffs for side in ("low", "high") for v in VARIANTS}
    rests = {"delta": "x_T's (only the delta's band kept)", "zeroed": "zeroed (Fig. 17)",
             "re-drawn": "fresh Gaussian (Fig. 18)"}
    table = [{"cutoff": f"{c:g}", "kept": f"{side} ({'<=' if side == 'low' else '>'} {c:g})", "rest": rests[v]}
             | _variant_columns(r) for (c, side, v), r in recs.items()]
    checks = {(c, v): recs[(c, "low", v)]["share"] > recs[(c, "high", v)]["share"]
              for c in cutoffs for v in ("zeroed", "re-drawn")}
    agrees = all(checks.values())
    low_adh = {c: recs[(c, "low", "delta")]["adherence"] - recs[(c, "high", "delta")]["adherence"] for c in cutoffs}
    figs = [_variant_plot(ctx, sweep, recs, cutoffs), _variant_picture(ctx, sweep, recs, cutoffs)]
    failed = ", ".join(f"{v} at {c:g}" for (c, v), ok in checks.items() if not ok)
    return ItemResult(
        ours=("Share of images closer to the refined image than to the Gaussian one, low vs high kept: "
              + "; ".join(f"cutoff {c:g}: zeroed {_low_high(recs, c, 'zeroed', 'share')}, re-drawn "
                          f"{_low_high(recs, c, 're-drawn', 'share')}" for c in cutoffs)
              + ". Adherence with only the delta's low vs high part: "
              + "; ".join(f"cutoff {c:g}: {_low_high(recs, c, 'delta', 'adherence')}" for c in cutoffs)
              + f" (x_T alone {sweep.gaussian_scores['adherence']:.3f}, the whole refinement "
                f"{measure.score(sweep.refined_images, sweep.prompts)['adherence']:.3f}); n = {sweep.n}."),
        verdict="agrees" if agrees else "differs",
        why=("Keeping the low frequencies reproduces more of the refined image than keeping the high ones, whether the "
             "rest is zeroed or re-drawn, as Fig. 17/18 show" + (
                 "; adherence, though, comes more from the delta's high part here."
                 if min(low_adh.values()) < 0 else ".")
             if agrees else
             f"Keeping the low frequencies does not reproduce more of the refined image than keeping the high ones "
             f"({failed}), against Fig. 17/18."),
        table=table, figures=figs,
        data={"n": sweep.n, "cutoffs": list(cutoffs),
              "variants": {f"{c:g}/{side}/{v}": _public(r) for (c, side, v), r in recs.items()}})


def _low_high(recs: dict, c: float, variant: str, key: str) -> str:
    """`low vs high` of one figure of a variant at cutoff c."""
    return f"{recs[(c, 'low', variant)][key]:.2f} vs {recs[(c, 'high', variant)][key]:.2f}"


def _variant_plot(ctx: ReportContext, sweep: Sweep, recs: dict, cutoffs: tuple[float, ...]) -> str:
    keys = [(side, v) for side in ("low", "high") for v in VARIANTS]
    x = list(range(len(keys)))
    ticks = list(zip(x, [f"{side} kept,\nrest {v}" for side, v in keys]))
    return figures.line_panels(ctx.figure_path("fig17.png", CAPTIONS["fig17.png"]), [
        Panel("adherence", "", "adherence (primary, ± 1 SE)", [
            Curve(f"cutoff {c:g}", x, [recs[(c, *k)]["adherence"] for k in keys],
                  [recs[(c, *k)]["adherence_se"] for k in keys], "o") for c in cutoffs], xticks=ticks),
        Panel("does the refined image appear?", "", "share closer to the refined image", [
            Curve(f"cutoff {c:g}", x, [recs[(c, *k)]["share"] for k in keys], style="o") for c in cutoffs],
            xticks=ticks),
    ], f"Fig. 17 / 18: low or high frequencies kept; the rest from x_T, zeroed or re-drawn (n = {sweep.n})")


def _variant_picture(ctx: ReportContext, sweep: Sweep, recs: dict, cutoffs: tuple[float, ...]) -> str:
    cols = min(4, sweep.n)
    rows = [sweep.gaussian_images[:cols], sweep.refined_images[:cols]]
    labels = ["x_T (Gaussian)", "x_hat_T (refined)"]
    for c in cutoffs:
        for side in ("low", "high"):
            for v in VARIANTS:
                rows.append(recs[(c, side, v)]["images"][:cols])
                labels.append(f"{side} <= {c:g} kept, rest {v}" if side == "low" else f"high > {c:g} kept, rest {v}")
    return figures.picture_grid(ctx.figure_path("fig17-images.png", CAPTIONS["fig17-images.png"]),
                                [list(r) for r in rows], labels,
                                [f"prompt/seed {i + 1}" for i in range(cols)],
                                "Fig. 17 / 18: images of band-filtered noises (unguided, DDIM 20)",
                                "'delta': x_T plus the kept band of the refinement; 'zeroed': only the kept band of "
                                "the refined noise; 're-drawn': the rest from an independent Gaussian.")


# -- Fig. 11: x0-predictions along the trajectory ---------------------------------------------------
def _trajectories(ctx: ReportContext, sweep: Sweep) -> dict[str, dict[str, torch.Tensor]]:
    """Per sampling (Gaussian unguided, Gaussian with the teacher's guidance, refined unguided):
    per-step verdicts of both judges on the x0-predictions of all n images, and the full
    trajectories of the first three (cached)."""
    guidance = measure.teacher().guidance
    rows: dict[str, tuple[Callable[[], torch.Tensor], Guidance]] = {
        "Gaussian, unguided": (lambda: sweep.x_T, UNGUIDED),
        f"Gaussian, {guidance.name}": (lambda: sweep.x_T, guidance),
        "refined, unguided": (lambda: sweep.x_T + sweep.delta, UNGUIDED)}
    out = {}
    for name, (noise, g) in rows.items():
        def compute(noise=noise, g=g) -> dict[str, torch.Tensor]:
            bb, x = measure.refiner().backbone, noise()
            traj = torch.cat([x0_trajectory(bb, x[i:i + measure.BATCH], sweep.prompts[i:i + measure.BATCH],
                                            SamplingOptions(g, STEPS))
                              for i in range(0, sweep.n, measure.BATCH)], dim=1)
            images = bb.decode(traj.flatten(0, 1)).clamp(-1, 1)
            prompts = sweep.prompts * STEPS
            verdicts = {j: torch.tensor(measure.correct(measure.judges()[j], images, prompts)).view(STEPS, sweep.n)
                        for j in ("primary", "heldout")}
            return {**verdicts, "first": images.view(STEPS, sweep.n, *images.shape[1:])[:, :3].contiguous()}
        out[name] = ctx.cached_tensors(f"x0-{name.replace(', ', '-')}-n{sweep.n}", compute)
    return out


@item("fig11", "Fig. 11: x0-predictions along the sampling trajectory",
      "Refined noise yields a coherent trajectory: its x0-predictions form a plausible layout in the first steps, "
      "while Gaussian noise sampled unguided fails to establish a structure early (SD2.1, qualitative; Fig. 20 shows "
      "the same with guidance).")
def fig11(ctx: ReportContext) -> ItemResult:
    sweep = Sweep.of(ctx)
    traj = _trajectories(ctx, sweep)
    names = list(traj)
    curves = {name: t["primary"].float().mean(1).tolist() for name, t in traj.items()}
    early = STEPS // 4 - 1  # the x0-prediction after the first quarter of the steps
    at = {name: {"correct": t["primary"][early].tolist(), "heldout_correct": t["heldout"][early].tolist()}
          for name, t in traj.items()}
    gain = measure.paired(at[names[2]], at[names[0]])
    agrees = gain[0] > 2 * gain[1]
    steps = list(range(1, STEPS + 1))
    table = [{"sampling": name} | {f"step {k}": f"{curves[name][k - 1]:.3f}" for k in (1, 3, 5, 10, 15, 20)}
             for name in names]
    shown = [1, 2, 3, 4, 6, 8, 11, 14, 17, 20]
    picture = [[traj[name]["first"][k - 1, i] for k in shown] for i in range(min(3, sweep.n)) for name in names]
    labels = [f"image {i + 1}\n{name}" for i in range(min(3, sweep.n)) for name in names]
    figs = [figures.line_panels(ctx.figure_path("fig11.png", CAPTIONS["fig11.png"]), [
                Panel("x0-prediction adherence per step", "sampler step (t from T to 0)", "adherence (primary judge)",
                      [Curve(name, steps, curves[name], style=s) for name, s in zip(names, ("o-", "^--", "s-"))]),
                Panel("held-out judge", "sampler step (t from T to 0)", "adherence (held-out judge)",
                      [Curve(name, steps, traj[name]["heldout"].float().mean(1).tolist(), style=s)
                       for name, s in zip(names, ("o-", "^--", "s-"))])],
                f"Fig. 11: is the prompt readable in the x0-prediction at each step? (n = {sweep.n}, DDIM {STEPS})"),
            figures.picture_grid(ctx.figure_path("fig11-strips.png", CAPTIONS["fig11-strips.png"]), picture, labels,
                                 [f"step {k}" for k in shown],
                                 "Fig. 11: x0-predictions from t = T (left) to the end (right)",
                                 "The same prompt and seed in each group of three rows.")]
    return ItemResult(
        ours=(f"After {early + 1} of {STEPS} steps the judge reads the prompt in {curves[names[2]][early]:.3f} of the "
              f"refined trajectories' x0-predictions, against {curves[names[0]][early]:.3f} for Gaussian noise "
              f"unguided (paired {diff(*gain)}) and {curves[names[1]][early]:.3f} with the teacher's guidance; "
              f"n = {sweep.n}."),
        verdict="agrees" if agrees else "differs",
        why=("Refined noise puts a readable layout into the early x0-predictions more often than Gaussian noise "
             "(beyond 2 SE), the coherent early trajectory of Fig. 11." if agrees else
             f"Early x0-predictions of refined noise are not readable more often than Gaussian noise's beyond 2 SE "
             f"({diff(*gain)} after {early + 1} steps), so the early layout of Fig. 11 does not show here."),
        table=table, figures=figs,
        data={"n": sweep.n, "steps": STEPS, "adherence_per_step": curves,
              "heldout_adherence_per_step": {k: t["heldout"].float().mean(1).tolist() for k, t in traj.items()},
              "early_step": early + 1, "early_gain": gain})


# -- Fig. 13: strength -------------------------------------------------------------------------------
STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)


@item("fig13", "Fig. 13: refinement strength s in x_T + s * delta",
      "Scaling the refiner's output controls the coherence of the image structure without retraining, like a "
      "guidance scale (SD2.1, qualitative).")
def fig13(ctx: ReportContext) -> ItemResult:
    sweep = Sweep.of(ctx)
    recs = [sweep.measure(f"strength{s:g}", lambda s=s: sweep.x_T + s * sweep.delta) for s in STRENGTHS]
    by = dict(zip(STRENGTHS, recs))
    rise = measure.paired(by[1.0], by[0.0])
    agrees = by[0.0]["adherence"] < by[0.5]["adherence"] < by[1.0]["adherence"] and rise[0] > 2 * rise[1]
    s = list(STRENGTHS)
    table = [{"strength s": f"{k:g}", "adherence": adherence(r), "held-out adherence": adherence(r, "heldout"),
              "FD / held-out FD": fd(r)} for k, r in by.items()]
    listed = ", ".join(f"s={k:g}: {r['adherence']:.3f}" for k, r in by.items())
    cols = min(4, sweep.n)
    figs = [figures.line_panels(ctx.figure_path("fig13.png", CAPTIONS["fig13.png"]), [
                Panel("adherence", "strength s", "adherence (± 1 SE)", [
                    Curve("primary judge", s, [r["adherence"] for r in recs], [r["adherence_se"] for r in recs]),
                    Curve("held-out judge", s, [r["heldout_adherence"] for r in recs],
                          [r["heldout_adherence_se"] for r in recs], "s-")]),
                Panel("Frechet distance", "strength s", "FD", [
                    Curve("primary judge", s, [r["fd"] for r in recs]),
                    Curve("held-out judge", s, [r["heldout_fd"] for r in recs], style="s-")])],
                f"Fig. 13: x_T + s * delta sampled unguided (n = {sweep.n})"),
            figures.picture_grid(ctx.figure_path("fig13-images.png", CAPTIONS["fig13-images.png"]),
                                 [[r["images"][i] for r in recs] for i in range(cols)],
                                 [sweep.prompts[i].removeprefix("a ") for i in range(cols)],
                                 [f"s = {k:g}" for k in STRENGTHS], "Fig. 13: the same noise at growing strength")]
    return ItemResult(
        ours=(f"Adherence {listed} (held-out "
              f"{by[0.0]['heldout_adherence']:.3f} at s=0, {by[1.0]['heldout_adherence']:.3f} at s=1, "
              f"{by[2.0]['heldout_adherence']:.3f} at s=2); FD {by[0.0]['fd']:.1f} at s=0, {by[1.0]['fd']:.1f} at s=1, "
              f"{by[2.0]['fd']:.1f} at s=2; n = {sweep.n}."),
        verdict="agrees" if agrees else "differs",
        why=(f"Adherence rises steadily from s = 0 to s = 1 ({diff(*rise)} paired), so s acts as a strength knob as "
             f"the paper shows." if agrees else
             f"Adherence does not rise steadily from s = 0 through 0.5 to 1 beyond 2 SE ({diff(*rise)} from 0 to 1), "
             f"so s is no clean strength knob here."),
        table=table, figures=figs,
        data={"n": sweep.n, "strengths": s, "scores": [_public(r) for r in recs], "rise_0_to_1": rise})


# -- Fig. 22: interpolation ----------------------------------------------------------------------------
INTERPOLATION = [k / 6 for k in range(7)]


@item("fig22", "Fig. 22: spherical interpolation between two noises, refined and not",
      "Refining slerp-interpolated Gaussian noises gives natural images that interpolate between the two ends, so "
      "the refiner maps the whole Gaussian space rather than memorising layouts (SD2.1, qualitative).")
def fig22(ctx: ReportContext) -> ItemResult:
    k = ctx.n(24, 3)
    s = measure.setup(ctx, k)
    a, b = measure.gaussian(s.seeds), measure.gaussian([x + PAIR_SEED_OFFSET for x in s.seeds])
    paths: dict[str, list[torch.Tensor]] = {"Gaussian": [], "refined": []}
    for i, t in enumerate(INTERPOLATION):
        paths["Gaussian"].append(measure.sampled(ctx, f"slerp-gaussian-{i}-k{k}", lambda t=t: slerp(a, b, t),
                                                 s.prompts))
        paths["refined"].append(measure.sampled(
            ctx, f"slerp-refined-{i}-k{k}", lambda t=t: slerp(a, b, t) + measure.delta(slerp(a, b, t), s.prompts),
            s.prompts))
    share = {name: [float(np.mean(measure.correct(measure.judges()["primary"], im, s.prompts))) for im in ims]
             for name, ims in paths.items()}
    inner = {name: float(np.mean(v[1:-1])) for name, v in share.items()}
    ends = {name: float(np.mean([v[0], v[-1]])) for name, v in share.items()}
    n_inner = k * (len(INTERPOLATION) - 2)
    keeps = inner["refined"] >= ends["refined"] - 2 * measure.se(ends["refined"], 2 * k)
    above = inner["refined"] > inner["Gaussian"]
    agrees = keeps and above
    table = [{"path": name} | {f"t = {t:.2f}": f"{v:.3f}" for t, v in zip(INTERPOLATION, share[name])}
             for name in paths]
    shown = min(3, k)
    picture = [paths[name][j][i] for i in range(shown) for name in paths for j in range(len(INTERPOLATION))]
    grid = [picture[r * len(INTERPOLATION):(r + 1) * len(INTERPOLATION)] for r in range(shown * 2)]
    labels = [f"{s.prompts[i].removeprefix('a ')}\n{name}" for i in range(shown) for name in paths]
    figs = [figures.line_panels(ctx.figure_path("fig22.png", CAPTIONS["fig22.png"]), [
                Panel("adherence along the path", "interpolation t (slerp)", "adherence (primary judge)",
                      [Curve(name, INTERPOLATION, share[name]) for name in paths])],
                f"Fig. 22: slerp between two Gaussian noises, sampled as is or refined ({k} pairs, unguided)"),
            figures.picture_grid(ctx.figure_path("fig22-images.png", CAPTIONS["fig22-images.png"]), grid, labels,
                                 [f"t = {t:.2f}" for t in INTERPOLATION],
                                 "Fig. 22: images along the interpolation (each pair: the same prompt)")]
    return ItemResult(
        ours=(f"Along the slerp path the refined noises' images keep adherence {inner['refined']:.3f} at the interior "
              f"points ({n_inner} images) against {ends['refined']:.3f} at the ends; the unrefined path "
              f"{inner['Gaussian']:.3f} inside, {ends['Gaussian']:.3f} at the ends; {k} pairs."),
        verdict="agrees" if agrees else "differs",
        why=("Refined interpolants stay as adherent as the refined ends (within 2 SE) and above the unrefined path, so "
             "the refiner works on the whole path, as Fig. 22 shows." if agrees else
             "Refined interpolants " + " and ".join(
                 ([] if keeps else ["lose adherence against the refined ends (beyond 2 SE)"])
                 + ([] if above else ["do no better than the unrefined path"])) + ", unlike Fig. 22."),
        table=table, figures=figs,
        data={"pairs": k, "t": INTERPOLATION, "adherence": share, "interior": inner, "ends": ends})
