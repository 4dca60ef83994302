"""Study 1, intrinsic rank vs task complexity.

For a corpus of t eligible classes, take n of them (each n of ``class_counts``, up to ``subsets_per_count`` random
subsets per n) with the number of training examples fixed across n. Each subset gets a full fine-tuning run (its
accuracy is the complexity proxy) and a LoRA run on ``lora.targets`` of every layer, whose adapters' energy ranks
(share ``energy_threshold`` of the squared singular values) are the outcome.

Report: accuracy vs n, and mean energy rank per matrix kind vs full fine-tuning accuracy, as least-squares lines with
95% confidence intervals, over single adapters (runs x layers) and over per-n means. The study reported R² > 0.95 for
accuracy vs n and R² 0.87-0.99 with negative slopes for energy rank vs accuracy.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from experiments.runner.analysis import fit_line
from experiments.runner.analysis import fmt_ci
from experiments.runner.analysis import markdown_table
from experiments.runner.analysis import mean_ci
from experiments.runner.analysis import pyplot
from experiments.runner.analysis import save_figure
from experiments.runner.context import RunContext
from experiments.runner.spec import RunSpec
from experiments.runner.store import atomic_write_text
from experiments.studies.common import classification_params
from experiments.studies.common import mean_rank_by_kind
from experiments.studies.common import run_classification

NAME = "rank_vs_classes"


@functools.lru_cache(maxsize=8)
def eligible_count(dataset: str, min_per_class: int) -> int:
    """Number of classes of ``dataset`` with at least ``min_per_class`` examples (loads the corpus once).

    Args:
        dataset: corpus name in ``lora_fast.data``.
        min_per_class: threshold.
    """
    from lora_fast import data

    return len(data.eligible_classes(data.load_dataset(dataset), min_per_class))


def plan(config: dict[str, Any]) -> list[RunSpec]:
    """A full and a LoRA run per (n, subset); n = t gets one subset, since only one exists."""
    section = config[NAME]
    t = eligible_count(section["dataset"], section["min_per_class"])
    specs = []
    for n in section["class_counts"]:
        if not 2 <= n <= t:
            raise ValueError(f"{NAME}: class count {n} outside 2..{t} (classes with >= min_per_class examples)")
        for subset in range(min(section["subsets_per_count"], math.comb(t, n))):
            for kind in ("full", "lora"):
                params = classification_params(config, section, kind, n, subset, 0.0, config["seed"])
                specs.append(RunSpec.make(NAME, f"{kind}-n{n:02d}-s{subset}", params))
    return specs


def execute(spec: RunSpec, ctx: RunContext) -> dict[str, Any]:
    """Train and analyse one run (see ``common.run_classification``)."""
    return run_classification(spec.params, ctx)


def _pairs(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(full, lora) rows of the same class subset."""
    full = {(r["params"]["n_classes"], r["params"]["subset"]): r for r in rows if r["params"]["kind"] == "full"}
    return [
        (full[key], r)
        for r in rows
        if r["params"]["kind"] == "lora" and (key := (r["params"]["n_classes"], r["params"]["subset"])) in full
    ]


def _line_row(label: str, fit: dict[str, float]) -> list[Any]:
    return [
        label,
        fmt_ci(fit["slope"], fit["slope_lo"], fit["slope_hi"], 3),
        fmt_ci(fit["intercept"], fit["intercept_lo"], fit["intercept_hi"], 3),
        fit["r2"],
        fit["n"],
    ]


def report(rows: list[dict[str, Any]], config: dict[str, Any], outdir: Path) -> str:
    """Tables ``accuracy_vs_classes.md``, ``energy_rank_vs_accuracy.md``; plots of both and of snapshots."""
    plt = pyplot()
    outdir.mkdir(parents=True, exist_ok=True)
    pairs = _pairs(rows)
    if not pairs:
        return f"### {NAME}\n\nno finished (full, LoRA) pairs yet.\n"
    kinds = sorted({a["kind"] for _, lo in pairs for a in lo["adapters"]})
    by_n: dict[int, list[tuple[dict, dict]]] = defaultdict(list)
    for full, lora in pairs:
        by_n[full["params"]["n_classes"]].append((full, lora))
    ns = sorted(by_n)

    # accuracy vs number of classes
    fits_acc = {
        kind: fit_line([f["params"]["n_classes"] for f, _ in pairs], [(f if kind == "full" else lo)["accuracy"]
                                                                       for f, lo in pairs])
        for kind in ("full", "lora")
    }  # fmt: skip
    per_n = []
    for n in ns:
        acc_full = mean_ci([f["accuracy"] for f, _ in by_n[n]])
        acc_lora = mean_ci([lo["accuracy"] for _, lo in by_n[n]])
        ranks = [mean_rank_by_kind(lo) for _, lo in by_n[n]]
        per_n.append(
            [n, len(by_n[n]), fmt_ci(acc_full[0], acc_full[0] - acc_full[1], acc_full[0] + acc_full[1]),
             fmt_ci(acc_lora[0], acc_lora[0] - acc_lora[1], acc_lora[0] + acc_lora[1]),
             *[sum(r[k] for r in ranks) / len(ranks) for k in kinds]]
        )  # fmt: skip
    table1 = "## Accuracy vs number of classes n (line: accuracy = slope·n + intercept, 95% CI)\n\n"
    table1 += markdown_table(
        ["fine-tuning", "slope [95% CI]", "intercept [95% CI]", "R²", "runs"],
        [_line_row(k, fits_acc[k]) for k in ("full", "lora")],
    )
    table1 += "\n## Per n (means over class subsets, 95% CI)\n\n"
    table1 += markdown_table(
        ["n", "subsets", "full FT accuracy", "LoRA accuracy", *[f"energy rank {k}" for k in kinds]], per_n
    )
    atomic_write_text(outdir / "accuracy_vs_classes.md", table1)

    # energy rank vs full fine-tuning accuracy, per matrix kind
    fits_adapter, fits_mean = {}, {}
    for k in kinds:
        xs, ys = [], []
        for full, lora in pairs:
            for a in lora["adapters"]:
                if a["kind"] == k:
                    xs.append(full["accuracy"])
                    ys.append(a["energy_rank"])
        fits_adapter[k] = fit_line(xs, ys)
        mean_x = [sum(f["accuracy"] for f, _ in by_n[n]) / len(by_n[n]) for n in ns]
        mean_y = [sum(mean_rank_by_kind(lo)[k] for _, lo in by_n[n]) / len(by_n[n]) for n in ns]
        fits_mean[k] = fit_line(mean_x, mean_y)
    table2 = "## Energy rank vs full fine-tuning accuracy (line: rank = slope·accuracy + intercept, 95% CI)\n\n"
    table2 += "Points: every adapter (runs × layers).\n\n"
    table2 += markdown_table(
        ["matrix", "slope [95% CI]", "intercept [95% CI]", "R²", "points"],
        [_line_row(k, fits_adapter[k]) for k in kinds],
    )
    table2 += "\nPoints: per-n means (over class subsets and layers), as the study's tables.\n\n"
    table2 += markdown_table(
        ["matrix", "slope [95% CI]", "intercept [95% CI]", "R²", "points"], [_line_row(k, fits_mean[k]) for k in kinds]
    )
    atomic_write_text(outdir / "energy_rank_vs_accuracy.md", table2)

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for kind, marker in (("full", "o"), ("lora", "s")):
        xs = [f["params"]["n_classes"] for f, _ in pairs]
        ys = [(f if kind == "full" else lo)["accuracy"] for f, lo in pairs]
        ax.scatter(xs, ys, marker=marker, alpha=0.7, label=f"{kind} (R²={fits_acc[kind]['r2']:.2f})")
        fit = fits_acc[kind]
        if math.isfinite(fit["slope"]):
            ax.plot(ns, [fit["slope"] * n + fit["intercept"] for n in ns], lw=1)
    ax.set(xlabel="number of classes n", ylabel="test accuracy", title="Accuracy vs classes")
    ax.legend(fontsize=8)
    save_figure(fig, outdir / "accuracy_vs_classes.png")

    fig, axes = plt.subplots(1, len(kinds), figsize=(4 * len(kinds), 3.6), squeeze=False)
    for ax, k in zip(axes[0], kinds, strict=True):
        xs = [f["accuracy"] for f, _ in pairs]
        ys = [mean_rank_by_kind(lo)[k] for _, lo in pairs]
        points = ax.scatter(xs, ys, c=[f["params"]["n_classes"] for f, _ in pairs], cmap="viridis", alpha=0.8)
        fit = fits_adapter[k]
        if math.isfinite(fit["slope"]):
            grid = [min(xs), max(xs)]
            ax.plot(grid, [fit["slope"] * x + fit["intercept"] for x in grid], "k-", lw=1)
        ax.set(xlabel="full fine-tuning accuracy", ylabel=f"mean energy rank over layers ({k})",
               title=f"{k}: slope {fit['slope']:.2f}, R² {fits_mean[k]['r2']:.2f} (per-n means)")  # fmt: skip
    fig.colorbar(points, ax=axes[0, -1], label="classes n")
    fig.tight_layout()
    save_figure(fig, outdir / "energy_rank_vs_accuracy.png")

    snap_rows = [lo for _, lo in pairs if lo.get("snapshots")]
    if snap_rows:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for n in ns:
            runs = [lo for f, lo in by_n[n] if lo.get("snapshots")]
            if runs:
                steps = [s["step"] for s in runs[0]["snapshots"]]
                means = [
                    sum(sum(s["energy_ranks"].values()) / len(s["energy_ranks"]) for s in (r["snapshots"][i] for r in
                                                                                             runs)) / len(runs)
                    for i in range(len(steps))
                ]  # fmt: skip
                ax.plot(steps, means, marker=".", label=f"n={n}")
        ax.set(xlabel="training step", ylabel="mean energy rank (all adapters)", title="Energy rank during training")
        ax.legend(fontsize=8)
        save_figure(fig, outdir / "energy_rank_during_training.png")

    lora_rows = [lo for _, lo in pairs]
    snap_time = sum(r["snapshot_time_s"] for r in lora_rows)
    train_time = sum(r["wall_time_s"] for r in lora_rows)
    n_snaps = sum(len(r.get("snapshots", [])) for r in lora_rows)
    m = config["model"]
    lines = [
        f"### {NAME}: {config[NAME]['dataset']}, n in {ns}, {len(pairs)} class subsets, "
        f"{m['name']} ({m.get('num_layers') or 'all'} layers), {config[NAME]['train_size']} training examples",
        "",
        f"- full FT accuracy vs n: slope {fits_acc['full']['slope']:.4f}/class, R² {fits_acc['full']['r2']:.3f} "
        "(study: R² > 0.95)",
        *[
            f"- energy rank of {k} vs full FT accuracy: slope {fits_mean[k]['slope']:.2f}, "
            f"R² {fits_mean[k]['r2']:.2f} over per-n means; slope {fits_adapter[k]['slope']:.2f} "
            f"[{fits_adapter[k]['slope_lo']:.2f}, {fits_adapter[k]['slope_hi']:.2f}] over adapters "
            "(study: negative, R² 0.87-0.99)"
            for k in kinds
        ],
        f"- energy-rank snapshots: {n_snaps} taken, {snap_time:.2f} s of {train_time:.1f} s LoRA training "
        f"({100 * snap_time / max(train_time, 1e-9):.1f}% overhead)",
    ]
    return "\n".join(lines) + "\n"
