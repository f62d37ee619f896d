"""The report's NoiseRefine training ablations (issue 15, item 1): Tab. 1 and Fig. 3 (image-space
MSD loss vs noise-space targets from inversion), Figs. 6 / 35 / 36 (MSD vs full-gradient
optimisation of one noise), Tab. 15 (MSD N = 5 vs 10) and Tab. 14 (LoRA vs a refiner trained from
scratch). The refiners share one target set and one budget (`report.training_runs`).
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

from noiserefine.backbones.loading import load_backbone
from noiserefine.report import format as fmt
from noiserefine.report.core import ItemResult, ReportContext, Verdict, item
from noiserefine.report.measure import paired
from noiserefine.report.inversion_pairs import inversion_pairs, pair_statistics
from noiserefine.report.noise_optimisation import optimise_noise, step_memory
from noiserefine.report.training_figures import (inversion_figure, optimisation_curves, score_bars,
                                                 state_gradient_maps)
from noiserefine.report.training_runs import LABELS, evaluation, shared_targets, sizes, train_config
from noiserefine.targets import load_targets

# (score key, per-image key for a paired difference or None, +1 if higher is better, name)
METRICS = (("adherence", "correct", 1, "adherence"), ("heldout_adherence", "heldout_correct", 1, "held-out adherence"),
           ("fd", None, -1, "FD"), ("heldout_fd", None, -1, "held-out FD"),
           ("teacher_mse_mean", "teacher_mse", -1, "MSE to the teacher's image"))
SIGNIFICANT = 2.0  # standard errors
BARS = ("Adherence (all three attributes right) under the primary and the held-out judge, the FD of judge features "
        "to 2,000 real renders, and the mean per-image MSE to the teacher's image of the same noise (autoguidance 3, "
        "20 steps: what distillation aims at), on the same prompts and seeds of the bench split for every row; error "
        "bars: one standard error (binomial; FD: bootstrap over the images).")


def contrast(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Row a minus row b on each metric, with its standard error (adherence: paired over the same
    images; FD: the two bootstrap errors combined) and whether a is significantly better or worse."""
    out = []
    for key, per_image, sign, name in METRICS:
        if per_image:
            diff, se = paired(a, b, per_image)
        else:
            diff, se = a[key] - b[key], math.hypot(a[key + "_se"], b[key + "_se"])
        gain = sign * diff
        out.append({"metric": name, "diff": diff, "se": se,
                    "better": gain > SIGNIFICANT * se, "worse": gain < -SIGNIFICANT * se})
    return out


def _says(contrasts: list[dict[str, Any]]) -> str:
    def one(c: dict[str, Any]) -> str:
        if c["metric"].startswith("MSE"):
            return f"{c['diff']:+.5f} ± {c['se']:.5f}"
        return fmt.diff(c["diff"], c["se"]) if c["metric"].endswith("adherence") else f"{c['diff']:+.1f} ± {c['se']:.1f}"

    return "; ".join(f"{c['metric']} {one(c)}" for c in contrasts)


def judged(contrasts: list[dict[str, Any]], winner: str, loser: str) -> tuple[Verdict, str]:
    """'agrees' when `winner` (the paper's better setting) is significantly better on some metric
    and worse on none; otherwise 'differs', naming what we found instead."""
    better = [c["metric"] for c in contrasts if c["better"]]
    worse = [c["metric"] for c in contrasts if c["worse"]]
    if better and not worse:
        return "agrees", f"{winner} is better than {loser} beyond {SIGNIFICANT:g} SE on {', '.join(better)} and worse on nothing."
    if worse:
        return "differs", (f"{winner} is worse than {loser} beyond {SIGNIFICANT:g} SE on {', '.join(worse)}"
                           + (f" (better on {', '.join(better)})" if better else "") + ".")
    return "differs", (f"no difference beyond {SIGNIFICANT:g} SE between {winner} and {loser} on any metric at "
                       "this training budget and n.")


def score_row(name: str, rec: dict[str, Any], steps: int | None = None) -> dict[str, Any]:
    """A table row: adherence under both judges (binomial SE) and FD (bootstrap SE)."""
    row = {"noise": name} | ({"sampler steps": steps} if steps is not None else {})
    row |= {"adherence": fmt.adherence(rec), "held-out adherence": fmt.adherence(rec, "heldout")}
    for key, label in (("fd", "FD"), ("heldout_fd", "held-out FD")):
        row[label] = fmt.pm(rec[key], rec[key + "_se"], 1)
    row["MSE to the teacher's image"] = fmt.pm(rec["teacher_mse_mean"], rec["teacher_mse_se"], 5)
    return row | {"n": rec["n"]}


def _scores(rec: dict[str, Any]) -> dict[str, Any]:
    """What report.json keeps of a row (not the per-image lists)."""
    return {k: v for k, v in rec.items() if not isinstance(v, list)}


def _summary(name: str, rec: dict[str, Any]) -> str:
    return (f"{name}: adherence {rec['adherence']:.3f} (held-out {rec['heldout_adherence']:.3f}), "
            f"FD {rec['fd']:.1f} (held-out {rec['heldout_fd']:.1f}), MSE to the teacher's image "
            f"{rec['teacher_mse_mean']:.5f}")


# -- Tab. 1 ---------------------------------------------------------------------------------------
@item("tab1", "Tab. 1: image-space loss (MSD) vs noise-space targets from inversion",
      "Training the refiner in image space (MSD, Eqs. 4-5) beats regressing the DDIM-inversion noise of the "
      "guided target (noise space) on every metric, SD 2.1: PickScore 21.62 vs 17.97, HPSv2 0.258 vs 0.087, "
      "AES 5.296 vs 4.079, ImageReward 0.190 vs -2.269, CLIPScore 36.43 vs 18.39; noise-space samples are "
      "blurry (Fig. 5) because inversion is approximate (Fig. 4).")
def tab1(ctx: ReportContext) -> ItemResult:
    rows = {v: evaluation(ctx, v) for v in ("gaussian", "noise", "msd10")}
    stats = inversion_statistics(ctx)
    contrasts = contrast(rows["msd10"], rows["noise"])
    verdict, why = judged(contrasts, "MSD", "the noise-space loss")
    figure = score_bars(ctx.figure_path("training_tab1.png", BARS), list(rows.values()), [LABELS[v] for v in rows],
                        "Tab. 1: image-space (MSD) vs noise-space loss, same targets and budget")
    ours = (f"{_summary('MSD', rows['msd10'])}; {_summary('noise space', rows['noise'])}; unrefined "
            f"{_summary('Gaussian', rows['gaussian'])}. MSD minus noise space: {_says(contrasts)}. "
            f"The noise-space target is off: x_T^Guide (10 inversion steps) sampled unguided lands at MSE "
            f"{stats['reconstruction_mse']:.4f} from the guided image it came from, x_T's own unguided sample at "
            f"{stats['plain_mse']:.4f} (Fig. 3, {stats['n']} targets). Sizes: {sizes(ctx).describe()}.")
    return ItemResult(ours, verdict, why, [score_row(LABELS[v], r) for v, r in rows.items()], [figure.name],
                      {"rows": {v: _scores(r) for v, r in rows.items()}, "msd_minus_noise": contrasts,
                       "reconstruction_mse": stats["reconstruction_mse"],
                       "training": {v: asdict(train_config(ctx, v)) for v in ("noise", "msd10")}})


# -- Fig. 3 ---------------------------------------------------------------------------------------
def inversion_statistics(ctx: ReportContext) -> dict[str, Any]:
    """Fig. 3's statistics over the first `inversions` shared targets (cached)."""
    size = sizes(ctx)

    def compute() -> dict[str, Any]:
        data = load_targets(shared_targets(ctx))
        return pair_statistics(inversion_pairs(load_backbone(), data, size.inversions))

    return ctx.cached_json(f"training-fig3-t{size.targets}-k{size.inversions}", compute)


@item("fig3", "Fig. 3: initial noise vs the inversion noise of its guided image",
      "On 10K SD 2.1 pairs, the DDIM-inversion noise x_T^Guide of a guided image lies much closer to its initial "
      "noise x_T than random pairs of noises do (histogram of pixel-wise |difference|), and the difference is "
      "mainly in low frequencies: a structured, learnable mapping (section 3.1). Inversion is approximate: the "
      "inversion noise does not reproduce its image exactly (Fig. 4).")
def fig3(ctx: ReportContext) -> ItemResult:
    s = inversion_statistics(ctx)
    closer = (s["mean_abs_inversion"] < s["mean_abs_random"]
              and s["closer_than_unpaired"] > SIGNIFICANT * s["closer_than_unpaired_se"])
    low = (s["low_share_inversion"] > s["low_share_random"]
           and s["low_share_gain"] > SIGNIFICANT * s["low_share_gain_se"])
    verdict: Verdict = "agrees" if closer and low else "differs"
    smooth = s["low_share_mismatched"] - s["low_share_random"] > (s["low_share_inversion"] - s["low_share_random"]) / 2
    why = (f"x_T^Guide is {'' if closer else 'not '}closer to its own x_T than to other noises (mean |difference| "
           f"{s['mean_abs_inversion']:.3f}; two Gaussian noises {s['mean_abs_random']:.3f}; unpaired "
           f"{s['mean_abs_mismatched']:.3f}, per target {s['closer_than_unpaired']:+.3f} ± "
           f"{s['closer_than_unpaired_se']:.3f}), and the paired difference has {'' if low else 'no '}more of its "
           f"power at <= {s['low_frequency']:g} cycles/pixel beyond {SIGNIFICANT:g} SE ({s['low_share_inversion']:.1%}; "
           f"two Gaussian noises {s['low_share_random']:.1%}; unpaired {s['low_share_mismatched']:.1%}, per target "
           f"{s['low_share_gain']:+.3f} ± {s['low_share_gain_se']:.3f})"
           + (": most of the excess over two Gaussian noises is the inversion noise's own smoothness, which the "
              "unpaired difference shares" if smooth else "") + ".")
    figure = inversion_figure(ctx.figure_path("training_fig3.png", (
        "(a) Pixel-wise |difference| between each shared target's noise x_T and the 10-step DDIM-inversion noise "
        "x_T^Guide of its guided image (blue), between two Gaussian noises (orange, the paper's reference) and "
        "between x_T^Guide and another target's noise (green: the same distributions, unpaired); (b) the mean "
        "power of those differences per radial spatial frequency (two Gaussian noises': flat).")), s)
    farther = "farther from it than" if s["reconstruction_mse"] > s["plain_mse"] else "nearer to it than"
    ours = (f"{s['n']} shared targets (autoguidance-3 teacher), inverted unguided in 10 DDIM steps: mean "
            f"|x_T - x_T^Guide| {s['mean_abs_inversion']:.3f} vs {s['mean_abs_random']:.3f} for two Gaussian noises and "
            f"{s['mean_abs_mismatched']:.3f} unpaired; pixel correlation of x_T and x_T^Guide {s['correlation']:.2f} "
            f"(unpaired {s['correlation_mismatched']:.2f}); share of the difference's power at <= {s['low_frequency']:g} "
            f"cycles/pixel {s['low_share_inversion']:.1%} vs {s['low_share_random']:.1%} and {s['low_share_mismatched']:.1%} "
            f"({s['low_share_white']:.1%} of the frequencies). The inversion noise's std is {s['inversion_std']:.2f} "
            f"(Gaussian: 1). Inversion error (Fig. 4): x_T^Guide sampled unguided lands at MSE "
            f"{s['reconstruction_mse']:.4f} from the guided image it came from, {farther} x_T's own unguided sample "
            f"({s['plain_mse']:.4f}).")
    table = [{"pairs": label, "mean |difference|": f"{s[f'mean_abs_{kind}']:.3f}",
              f"power share <= {s['low_frequency']:g} cycles/pixel": f"{s[f'low_share_{kind}']:.1%}"}
             for kind, label in (("inversion", "x_T, its own inversion noise x_T^Guide"),
                                 ("random", "x_T, another Gaussian noise"),
                                 ("mismatched", "another target's x_T, x_T^Guide (unpaired)"))]
    return ItemResult(ours, verdict, why, table, [figure.name], s)


# -- Figs. 6 / 35 / 36 ---------------------------------------------------------------------------
def noise_optimisation(ctx: ReportContext) -> dict[str, Any]:
    """Both optimisations of the first `noises` shared targets' x_T, and one step's memory of each
    at batch `memory_batch` (cached)."""
    size = sizes(ctx)

    def compute() -> dict[str, Any]:
        data = load_targets(shared_targets(ctx))
        backbone = load_backbone()
        k, m = size.noises, size.memory_batch
        runs = {mode: optimise_noise(backbone, data.x_T[:k], data.x_0[:k], data.prompts[:k], mode, size.iterations,
                                     size.optimisation_steps) for mode in ("full", "msd")}
        memory = {mode: step_memory(backbone, data.x_T[:m], data.x_0[:m], data.prompts[:m], mode,
                                    size.optimisation_steps)
                  for mode in ("msd", "full")}  # the small one first: each measures growth above its start
        return {"runs": runs, "memory": memory}

    return ctx.cached_json(f"training-fig6-t{size.targets}-k{size.noises}-i{size.iterations}-N{size.optimisation_steps}"
                           f"-m{size.memory_batch}", compute)


def _stability(run: dict[str, Any]) -> dict[str, float]:
    """Final mean loss, and how erratic the gradient at x_T is: the largest iteration-to-iteration
    jump of its norm (factor) over noises and iterations."""
    grads = run["grad_norm"]
    jumps = [max(a[j], b[j]) / max(min(a[j], b[j]), 1e-30) for a, b in zip(grads, grads[1:]) for j in range(len(a))]
    return {"final_loss": sum(run["final_loss"]) / len(run["final_loss"]),
            "first_loss": sum(run["loss"][0]) / len(run["loss"][0]),
            "max_grad_jump": max(jumps, default=1.0)}


@item("fig6", "Figs. 6 / 35 / 36: MSD vs full-gradient optimisation of one noise",
      "Optimising a noise so that its sample matches a guided target, MSD (stop-gradient on the denoiser, Eq. 5) "
      "converges faster and stably while the full gradient (Eq. 3) fails to converge, its gradient norm large and "
      "erratic and growing across the denoising steps (gradient explosion, Figs. 35-36); MSD also saves the "
      "memory of back-propagating through N denoiser calls.")
def fig6(ctx: ReportContext) -> ItemResult:
    result = noise_optimisation(ctx)
    runs, memory = result["runs"], result["memory"]
    st = {mode: _stability(run) for mode, run in runs.items()}
    converges = st["msd"]["final_loss"] <= st["full"]["final_loss"]
    cheaper = memory["msd"]["saved_for_backward_mb"] < memory["full"]["saved_for_backward_mb"]
    verdict: Verdict = "agrees" if converges and cheaper else "differs"
    erratic = st["full"]["max_grad_jump"] > st["msd"]["max_grad_jump"]
    why = (f"MSD ends at a {'lower' if converges else 'higher'} loss than the full gradient "
           f"({st['msd']['final_loss']:.4f} vs {st['full']['final_loss']:.4f}, from {st['full']['first_loss']:.4f}), "
           f"keeps {'less' if cheaper else 'more'} for backward "
           f"({memory['msd']['saved_for_backward_mb']:.1f} vs {memory['full']['saved_for_backward_mb']:.1f} MB), and "
           f"the full gradient's norm is {'more' if erratic else 'not more'} erratic (largest jump between iterations "
           f"x{st['full']['max_grad_jump']:.2f} vs x{st['msd']['max_grad_jump']:.2f}); the verdict rests on the "
           "first two.")
    figures = [optimisation_curves(ctx.figure_path("training_fig6_curves.png", (
        "Adam on the initial noises themselves, toward their own guided targets: MSE of the unguided sample to "
        "the target (left) and the norm of the gradient reaching x_T (right); thin lines are single noises.")), runs).name,
               state_gradient_maps(ctx.figure_path("training_fig36_states.png", (
        "||dL/dx_t||^2 at x_T and after each sampler step, at every optimisation iteration, for the full "
        "gradient and MSD (same colour scale), and its median and maximum over iterations.")), runs).name]
    first = runs["msd"]
    ours = (f"{len(first['loss'][0])} noises of the shared targets, each optimised toward its own guided target "
            f"for {len(first['loss'])} Adam steps (lr {first['lr']:g}) through a {first['steps']}-step unguided DDIM "
            f"sampler. Final MSE: MSD {st['msd']['final_loss']:.4f}, full gradient {st['full']['final_loss']:.4f}. "
            f"Largest jump of the gradient norm between iterations: x{st['msd']['max_grad_jump']:.2f} (MSD) vs "
            f"x{st['full']['max_grad_jump']:.2f} (full). Memory of one step at batch {memory['msd']['batch']}: "
            f"tensors saved for backward {memory['msd']['saved_for_backward_mb']:.1f} MB (MSD) vs "
            f"{memory['full']['saved_for_backward_mb']:.1f} MB (full); peak RSS above the step's start (kernel "
            f"VmHWM, CPU) {memory['msd']['peak_rss_mb']:.0f} vs {memory['full']['peak_rss_mb']:.0f} MB.")
    table = [{"gradient": mode, "final MSE": f"{st[mode]['final_loss']:.4f}",
              "largest gradient-norm jump": f"x{st[mode]['max_grad_jump']:.2f}",
              "saved for backward (MB)": f"{memory[mode]['saved_for_backward_mb']:.1f}",
              "peak RSS (MB)": f"{memory[mode]['peak_rss_mb']:.0f}"} for mode in ("msd", "full")]
    return ItemResult(ours, verdict, why, table, figures, {"stability": st, "memory": memory, "runs": runs})


# -- Tab. 15 --------------------------------------------------------------------------------------
@item("tab15", "Tab. 15: MSD with N = 5 vs N = 10 sampler steps in the loss",
      "N = 10 MSD steps train a better refiner than N = 5 (FID 13.36 vs 13.74), and more steps would cost "
      "prohibitive back-propagation without MSD (appendix C.2).")
def tab15(ctx: ReportContext) -> ItemResult:
    few = sizes(ctx).few_steps
    rows = {(v, s): evaluation(ctx, v, s) for s in (20, few) for v in ("gaussian", "msd5", "msd10")}
    at20, atfew = contrast(rows["msd10", 20], rows["msd5", 20]), contrast(rows["msd10", few], rows["msd5", few])
    verdict, why = judged(at20, "N = 10", "N = 5")
    figure = score_bars(ctx.figure_path("training_tab15.png", BARS), list(rows.values()),
                        [f"{LABELS[v]}, {s} steps" for v, s in rows], "Tab. 15: MSD N = 5 vs N = 10, sampled at 20 "
                        f"and {few} steps")
    ours = (f"sampled in 20 steps: {_summary('N = 10', rows['msd10', 20])}; {_summary('N = 5', rows['msd5', 20])}; "
            f"N = 10 minus N = 5: {_says(at20)}. Sampled in {few} steps: N = 10 minus N = 5: {_says(atfew)}. "
            f"Sizes: {sizes(ctx).describe()}.")
    why += f" At {few} sampler steps: " + judged(atfew, "N = 10", "N = 5")[1]
    return ItemResult(ours, verdict, why, [score_row(LABELS[v], r, s) for (v, s), r in rows.items()], [figure.name],
                      {"rows": {f"{v}@{s}": _scores(r) for (v, s), r in rows.items()},
                       "n10_minus_n5": {"20": at20, str(few): atfew}})


# -- Tab. 14 --------------------------------------------------------------------------------------
@item("tab14", "Tab. 14: LoRA on the pretrained model vs the refiner trained from scratch",
      "A LoRA on the pretrained UNet converges faster than the same UNet trained from scratch and reaches a far "
      "lower FID at the same iteration (25K steps, SD 2.1): 13.74 vs 37.87 (appendix C.1).")
def tab14(ctx: ReportContext) -> ItemResult:
    rows = {v: evaluation(ctx, v) for v in ("gaussian", "scratch", "msd10")}
    contrasts = contrast(rows["msd10"], rows["scratch"])
    verdict, why = judged(contrasts, "the LoRA refiner", "the one from scratch")
    figure = score_bars(ctx.figure_path("training_tab14.png", BARS), list(rows.values()), [LABELS[v] for v in rows],
                        "Tab. 14: LoRA vs from scratch, same targets, loss and budget")
    ours = (f"{_summary('LoRA', rows['msd10'])}; {_summary('from scratch', rows['scratch'])}; LoRA minus scratch: "
            f"{_says(contrasts)}. The scratch refiner is the base UNet's architecture, randomly initialised, all "
            f"parameters trained, output layer zeroed (starts as the identity, as the LoRA refiner does). "
            f"Sizes: {sizes(ctx).describe()}.")
    return ItemResult(ours, verdict, why, [score_row(LABELS[v], r) for v, r in rows.items()], [figure.name],
                      {"rows": {v: _scores(r) for v, r in rows.items()}, "lora_minus_scratch": contrasts})
