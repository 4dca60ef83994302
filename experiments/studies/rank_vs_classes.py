"""Study 1: energy rank of LoRA adapters vs the number of classes and full fine-tuning accuracy.

For a corpus of t eligible classes, take n of them (each n of ``class_counts``, ``subsets_per_count`` random subsets
per n) with the number of training examples fixed across n. Each subset gets a full fine-tuning run (its accuracy
is the complexity proxy) and a LoRA run on ``lora.targets`` of every layer, whose adapters' energy ranks (share
``lora.energy_threshold`` of the squared singular values) are the outcome.

Controls: every LoRA run also records the energy rank of an untrained adapter of each shape (A at init, B random at
the trained B's scale); ``shuffled_control_subsets`` extra LoRA runs per n train on fully shuffled labels (p = 1).
Both are drawn as reference lines, and energy rank is also shown against n − 1, the rank of the classifier
gradient's span, to see whether the trend is more than the number of classes.

Statistics: the unit is a run (one class subset); per-layer energy ranks are averaged within a run first. Lines
are fitted over runs (intervals from their spread) and, as the published tables did, over per-n means. The study
reported R² > 0.95 for accuracy vs n and negative slopes with R² 0.87-0.99 for energy rank vs accuracy.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from experiments.runner.analysis import ci_halfwidth
from experiments.runner.analysis import fit_line
from experiments.runner.analysis import kind_means
from experiments.runner.analysis import last_quarter_change
from experiments.runner.analysis import mean_ci
from experiments.runner.analysis import sign_verdict
from experiments.runner.config import ConfigError
from experiments.runner.config import LoraSettings
from experiments.runner.config import ModelSettings
from experiments.runner.config import SweepConfig
from experiments.runner.config import TrainSettings
from experiments.runner.context import RunContext
from experiments.runner.report import fmt
from experiments.runner.report import fmt_ci
from experiments.runner.report import markdown_table
from experiments.runner.report import pyplot
from experiments.runner.report import save_figure
from experiments.runner.spec import RunSpec
from experiments.runner.store import atomic_write_text
from experiments.studies._classification import ClassCountSweep
from experiments.studies._classification import clipart_options
from experiments.studies._classification import run_classification
from experiments.studies._classification import sweep_specs
from experiments.studies._classification import vit_full
from experiments.studies._classification import vit_lora
from experiments.studies._classification import vit_model

NAME = "rank_vs_classes"


@dataclasses.dataclass(frozen=True)
class Config(ClassCountSweep):
    """Study 1's settings (``ClassCountSweep``'s, plus the shuffled-label control).

    Args:
        shuffled_control_subsets: per n, LoRA runs on fully shuffled labels for the first subsets (0 = none).
    """

    shuffled_control_subsets: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.shuffled_control_subsets < 0:
            raise ConfigError(f"shuffled_control_subsets must be >= 0, got {self.shuffled_control_subsets}")


@dataclasses.dataclass(frozen=True)
class VitConfig(Config):
    """Study 1 on the ViT: DINOv2 ViT-S/14 (a checkpoint tuned further for saliency) on clip-art sub-categories.

    Clip art has 22 sub-categories with >= 40 cleaned images; a quarter of each class is held out (10 of 40), so every
    run trains on 60 images whatever n (30 per class at n = 2, 3-4 at n = 16) and is evaluated on up to 10 held-out
    images per class. Images at 56 px (4 x 4 patches), LoRA r = 32 on query/key/value of all 12 blocks.
    """

    dataset: str = "clipart"
    dataset_options: dict[str, Any] = dataclasses.field(default_factory=clipart_options)
    test_fraction: float = 0.25
    min_per_class: int = 40
    train_size: int = 60
    eval_size: int = 160
    model: ModelSettings = dataclasses.field(default_factory=vit_model)
    lora: LoraSettings = dataclasses.field(default_factory=vit_lora)
    full: TrainSettings = dataclasses.field(default_factory=vit_full)
    class_counts: tuple[int, ...] = (2, 8, 16)
    subsets_per_count: int = 2
    shuffled_control_subsets: int = 1


@dataclasses.dataclass(frozen=True)
class VitFashionConfig(VitConfig):
    """Study 1 on the ViT with Fashion-MNIST (grey clothing photos, resized to RGB 56 px) as the control corpus.

    100 images per class are drawn (80 for training, 20 held out); 120 training images per run whatever n.
    """

    dataset: str = "fashion_mnist_rgb"
    dataset_options: dict[str, Any] = dataclasses.field(default_factory=lambda: {"size": 56, "per_class": 100})
    test_fraction: float = 0.2
    min_per_class: int = 100
    train_size: int = 120
    eval_size: int = 200
    class_counts: tuple[int, ...] = (2, 5, 10)
    subsets_per_count: int = 3


@dataclasses.dataclass(frozen=True)
class Vit112Config(VitConfig):
    """Study 1 on the ViT with clip art at 112 px (8 x 8 patches: 65 tokens instead of 17; 3.4x the cost per step)."""

    dataset_options: dict[str, Any] = dataclasses.field(default_factory=lambda: {"size": 112, "min_images": 40})
    class_counts: tuple[int, ...] = (8,)
    subsets_per_count: int = 5
    shuffled_control_subsets: int = 0


def plan(config: SweepConfig, name: str = NAME) -> list[RunSpec]:
    """A full and a LoRA run per (n, subset), and the shuffled-label LoRA controls."""
    return sweep_specs(config, name, kinds=("full", "lora"), shuffled=True)


def execute(spec: RunSpec, ctx: RunContext) -> dict[str, Any]:
    """Train and analyse one run (see ``_classification.run_classification``)."""
    return run_classification(spec.params, ctx)


# ------------------------------------------------------------------------------------------------------- report


def _pairs(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(full, lora) rows of the same class subset, clean labels."""
    clean = [r for r in rows if r["params"]["noise"] == 0]
    full = {(r["params"]["n_classes"], r["params"]["subset"]): r for r in clean if r["params"]["kind"] == "full"}
    return [
        (full[key], r)
        for r in clean
        if r["params"]["kind"] == "lora" and (key := (r["params"]["n_classes"], r["params"]["subset"])) in full
    ]


def _fit_row(label: str, fit: dict[str, float], expected: int | None = None) -> list[Any]:
    row = [label, fmt_ci(fit["slope"], fit["slope_lo"], fit["slope_hi"]),
           fmt_ci(fit["intercept"], fit["intercept_lo"], fit["intercept_hi"]), fit["r2"], fit["n"],
           fmt(ci_halfwidth(fit))]  # fmt: skip
    return [*row, sign_verdict(fit, expected)] if expected is not None else row


def _slope(fit: dict[str, float], digits: int) -> str:
    return fmt_ci(fit["slope"], fit["slope_lo"], fit["slope_hi"], digits)


FIT_HEADERS = ["", "slope [95% CI]", "intercept [95% CI]", "R²", "points", "smallest |slope| the CI excludes 0 at"]


def _snapshot_mean(snapshot: dict[str, Any]) -> float:
    return statistics.fmean(snapshot["energy_ranks"].values())


def convergence(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """How settled the runs were: per run, the change of eval accuracy over the last quarter of training (and, for
    LoRA runs, of the mean energy rank, from snapshots); their mean with a 95% interval over runs, and the largest.

    Args:
        rows: finished runs with ``eval_history`` (and ``snapshots``).
    """
    acc = [last_quarter_change(r["eval_history"], "accuracy") for r in rows]
    ranks = []
    for r in rows:
        history = [{"step": s["step"], "rank": _snapshot_mean(s)} for s in r.get("snapshots", [])]
        ranks.append(last_quarter_change(history, "rank"))
    out: dict[str, Any] = {}
    for key, values in (("acc", acc), ("rank", ranks)):
        values = [v for v in values if math.isfinite(v)]
        mean, half = mean_ci(values)
        out[key] = fmt_ci(mean, mean - half, mean + half, 3) if values else "n/a"
        out[f"{key}_mean"] = mean
        out[f"{key}_max"] = max(values, key=abs) if values else float("nan")
    return out


def saturation(rows: list[dict[str, Any]]) -> tuple[int, int, int]:
    """(adapters whose energy rank reached their rank r, adapters, largest energy rank) over LoRA runs."""
    adapters = [a for r in rows for a in r["adapters"]]
    return sum(a["energy_rank"] >= a["r"] for a in adapters), len(adapters), max((a["energy_rank"] for a in adapters),
                                                                                 default=0)  # fmt: skip


def report(rows: list[dict[str, Any]], config: SweepConfig, outdir: Path, name: str = NAME) -> str:
    """Tables ``accuracy_vs_classes.md``, ``energy_rank_vs_accuracy.md``, ``energy_rank_vs_classes.md``,
    ``convergence.md``; plots of each."""
    outdir.mkdir(parents=True, exist_ok=True)
    section = config.section(name)
    pairs = _pairs(rows)
    if not pairs:
        return f"### {name}\n\nno finished (full, LoRA) pairs yet.\n"
    shuffled = [r for r in rows if r["params"]["kind"] == "lora" and r["params"]["noise"] == 1.0]
    lora_rows = [lo for _, lo in pairs]
    kinds = sorted({a["kind"] for lo in lora_rows for a in lo["adapters"]})
    by_n: dict[int, list[tuple[dict, dict]]] = defaultdict(list)
    for full, lora in pairs:
        by_n[full["params"]["n_classes"]].append((full, lora))
    ns = sorted(by_n)
    rank = {id(lo): kind_means(lo["adapters"]) for lo in lora_rows + shuffled}
    control = {id(lo): kind_means(lo["adapters"], "control_energy_rank") for lo in lora_rows}
    control_mean = {k: statistics.fmean(control[id(lo)][k] for lo in lora_rows) for k in kinds}
    shuffled_by_n = {n: [r for r in shuffled if r["params"]["n_classes"] == n] for n in ns}
    shuffled_mean = {k: statistics.fmean(rank[id(r)][k] for r in shuffled) for k in kinds} if shuffled else {}

    # accuracy vs n, over runs
    fits_acc = {
        kind: fit_line([f["params"]["n_classes"] for f, _ in pairs], [(f if kind == "full" else lo)["accuracy"]
                                                                       for f, lo in pairs])
        for kind in ("full", "lora")
    }  # fmt: skip

    def ci_cell(values: list[float], digits: int = 3) -> str:
        m, h = mean_ci(values)
        return fmt_ci(m, m - h, m + h, digits)

    per_n = []
    for n in ns:
        group = by_n[n]
        per_n.append(
            [n, len(group), ci_cell([f["accuracy"] for f, _ in group]), ci_cell([lo["accuracy"] for _, lo in group]),
             *[ci_cell([rank[id(lo)][k] for _, lo in group], 2) for k in kinds],
             *[fmt(statistics.fmean(rank[id(r)][k] for r in shuffled_by_n[n]), 2) if shuffled_by_n[n] else "n/a"
               for k in kinds]]
        )  # fmt: skip
    text = "## Accuracy vs number of classes n (line over runs: accuracy = slope·n + intercept, 95% CI)\n\n"
    text += markdown_table(["fine-tuning", *FIT_HEADERS[1:], "vs study (falls with n)"],
                           [_fit_row(k, fits_acc[k], -1) for k in ("full", "lora")])  # fmt: skip
    text += ("\n## Per n (mean [95% CI] over class subsets; energy rank = mean over layers within a run; shuffled: "
             "LoRA on fully shuffled labels)\n\n")  # fmt: skip
    text += markdown_table(["n", "subsets", "full FT accuracy", "LoRA accuracy", *[f"energy rank {k}" for k in kinds],
                            *[f"shuffled {k}" for k in kinds]], per_n)  # fmt: skip
    atomic_write_text(outdir / "accuracy_vs_classes.md", text)

    # energy rank vs full fine-tuning accuracy, per matrix kind: over runs, and over per-n means as the study did
    fits_run, fits_mean = {}, {}
    for k in kinds:
        fits_run[k] = fit_line([f["accuracy"] for f, _ in pairs], [rank[id(lo)][k] for _, lo in pairs])
        fits_mean[k] = fit_line([statistics.fmean(f["accuracy"] for f, _ in by_n[n]) for n in ns],
                                [statistics.fmean(rank[id(lo)][k] for _, lo in by_n[n]) for n in ns])  # fmt: skip
    text = "## Energy rank vs full fine-tuning accuracy (rank = slope·accuracy + intercept, 95% CI)\n\n"
    text += "Points: runs (one class subset each; energy rank averaged over the run's layers).\n\n"
    text += markdown_table(["matrix", *FIT_HEADERS[1:], "vs study (negative)"],
                           [_fit_row(k, fits_run[k], -1) for k in kinds])  # fmt: skip
    text += "\nPoints: per-n means (over class subsets), as the study's tables.\n\n"
    text += markdown_table(["matrix", *FIT_HEADERS[1:]], [_fit_row(k, fits_mean[k]) for k in kinds])
    text += "\nReference levels (mean energy rank over layers and runs): " + "; ".join(
        f"{k}: untrained adapter {control_mean[k]:.2f}"
        + (f", shuffled labels {shuffled_mean[k]:.2f}" if shuffled_mean else "")
        for k in kinds
    ) + ".\n"  # fmt: skip
    atomic_write_text(outdir / "energy_rank_vs_accuracy.md", text)

    # energy rank vs n - 1
    fits_n = {k: fit_line([f["params"]["n_classes"] - 1 for f, _ in pairs], [rank[id(lo)][k] for _, lo in pairs])
              for k in kinds}  # fmt: skip
    text = (
        "## Energy rank vs n − 1 (the rank of the classifier gradient's span; line over runs, 95% CI)\n\n"
        "A slope of 1 with intercept 0 would mean the adapters learn no more directions than the head needs.\n\n"
    )
    text += markdown_table(["matrix", *FIT_HEADERS[1:], "vs study (rises with n)"],
                           [_fit_row(k, fits_n[k], +1) for k in kinds])  # fmt: skip
    atomic_write_text(outdir / "energy_rank_vs_classes.md", text)

    # how settled training was, and whether r capped the energy rank
    conv = {kind: convergence([f if kind == "full" else lo for f, lo in pairs]) for kind in ("full", "lora")}
    reached, total, top = saturation(lora_rows)
    text = "## Convergence (change over the last quarter of training; mean over runs, and the largest)\n\n"
    text += markdown_table(
        ["runs", "eval accuracy change [95% CI]", "largest", "mean energy rank change [95% CI]", "largest"],
        [[kind, conv[kind]["acc"], conv[kind]["acc_max"], conv[kind]["rank"], conv[kind]["rank_max"]]
         for kind in ("full", "lora")],
    )  # fmt: skip
    text += (
        "\nEval accuracy is measured on the run's held-out examples (its standard error is about "
        f"{math.sqrt(0.25 / section.eval_size):.3f} at accuracy 0.5), so changes of that size are noise.\n"
    )
    text += (f"\n## Rank cap\n\n{reached} of {total} adapters ({100 * reached / max(total, 1):.1f}%) reached their "
             f"rank r = {section.lora['r']}; the largest energy rank was {top}.\n")  # fmt: skip
    atomic_write_text(outdir / "convergence.md", text)

    _plots(outdir, pairs, by_n, ns, kinds, rank, control_mean, shuffled_by_n, shuffled_mean, fits_acc, fits_run,
           fits_mean, section.lora["r"])  # fmt: skip

    m = section.model
    slope_lines = [
        f"- energy rank of {k} vs full FT accuracy over {fits_run[k]['n']} runs: slope {_slope(fits_run[k], 2)} "
        f"({sign_verdict(fits_run[k], -1)}; study: negative); R² {fits_mean[k]['r2']:.2f} over per-n means "
        f"(study: 0.87-0.99); this design's CI excludes 0 only for |slope| > {ci_halfwidth(fits_run[k]):.2f}"
        for k in kinds
    ]
    lines = [
        f"### {name}: {section.dataset}, n in {ns}, {len(pairs)} class subsets, {m.name} "
        f"({m.num_layers or 'all'} layers), {section.train_size} training examples, LoRA r={section.lora['r']}",
        "",
        f"- full FT accuracy vs n: slope {_slope(fits_acc['full'], 4)}/class, R² {fits_acc['full']['r2']:.3f} over "
        "runs (study: R² > 0.95)",
        *slope_lines,
        *[f"- energy rank of {k} vs n − 1: slope {_slope(fits_n[k], 2)}, intercept {fits_n[k]['intercept']:.2f}"
          for k in kinds],
        "- controls (mean energy rank over layers): " + "; ".join(
            f"{k}: trained {statistics.fmean(rank[id(lo)][k] for lo in lora_rows):.2f}, untrained adapter "
            f"{control_mean[k]:.2f}" + (f", shuffled labels {shuffled_mean[k]:.2f}" if shuffled_mean else "")
            for k in kinds),
        f"- rank cap: {reached}/{total} adapters ({100 * reached / max(total, 1):.1f}%) reached r = "
        f"{section.lora['r']} (largest energy rank {top})",
        f"- settled? over the last quarter of training eval accuracy moved {conv['full']['acc']} (full, largest "
        f"{conv['full']['acc_max']:+.3f}) and {conv['lora']['acc']} (LoRA, largest {conv['lora']['acc_max']:+.3f}); "
        f"the mean energy rank moved {conv['lora']['rank']}",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def _plots(outdir: Path, pairs: list, by_n: dict, ns: list[int], kinds: list[str], rank: dict, control_mean: dict,
           shuffled_by_n: dict, shuffled_mean: dict, fits_acc: dict, fits_run: dict, fits_mean: dict,
           r: int) -> None:  # fmt: skip
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for kind, marker in (("full", "o"), ("lora", "s")):
        xs = [f["params"]["n_classes"] for f, _ in pairs]
        ys = [(f if kind == "full" else lo)["accuracy"] for f, lo in pairs]
        ax.scatter(xs, ys, marker=marker, alpha=0.7, label=f"{kind} (R²={fits_acc[kind]['r2']:.2f})")
        fit = fits_acc[kind]
        if math.isfinite(fit["slope"]):
            ax.plot(ns, [fit["slope"] * n + fit["intercept"] for n in ns], lw=1)
    ax.set(xlabel="number of classes n", ylabel="test accuracy", title="Accuracy vs classes (one point per run)")
    ax.legend(fontsize=8)
    save_figure(fig, outdir / "accuracy_vs_classes.png")

    fig, axes = plt.subplots(1, len(kinds), figsize=(4 * len(kinds), 3.6), squeeze=False)
    for ax, k in zip(axes[0], kinds, strict=True):
        xs = [f["accuracy"] for f, _ in pairs]
        ys = [rank[id(lo)][k] for _, lo in pairs]
        points = ax.scatter(xs, ys, c=[f["params"]["n_classes"] for f, _ in pairs], cmap="viridis", alpha=0.8)
        fit = fits_run[k]
        if math.isfinite(fit["slope"]):
            grid = [min(xs), max(xs)]
            ax.plot(grid, [fit["slope"] * x + fit["intercept"] for x in grid], "k-", lw=1)
        ax.axhline(control_mean[k], color="grey", ls="--", lw=1, label="untrained adapter")
        if shuffled_mean:
            ax.axhline(shuffled_mean[k], color="red", ls=":", lw=1, label="shuffled labels")
        ax.set(xlabel="full fine-tuning accuracy", ylabel=f"energy rank ({k}, mean over layers)",
               title=f"{k}: slope {fit['slope']:.2f}, R² {fits_mean[k]['r2']:.2f} (per-n)")  # fmt: skip
        ax.legend(fontsize=7)
    fig.colorbar(points, ax=axes[0, -1], label="classes n")
    fig.tight_layout()
    save_figure(fig, outdir / "energy_rank_vs_accuracy.png")

    fig, axes = plt.subplots(1, len(kinds), figsize=(4 * len(kinds), 3.6), squeeze=False)
    for ax, k in zip(axes[0], kinds, strict=True):
        ax.scatter([f["params"]["n_classes"] - 1 for f, _ in pairs], [rank[id(lo)][k] for _, lo in pairs], alpha=0.5,
                   s=14, label="runs")  # fmt: skip
        stats = [mean_ci([rank[id(lo)][k] for _, lo in by_n[n]]) for n in ns]
        ax.errorbar([n - 1 for n in ns], [m for m, _ in stats], yerr=[0 if math.isnan(h) else h for _, h in stats],
                    fmt="o-", capsize=3, label="mean [95% CI]")  # fmt: skip
        with_shuffled = [n for n in ns if shuffled_by_n[n]]
        if with_shuffled:
            ax.plot([n - 1 for n in with_shuffled],
                    [statistics.fmean(rank[id(r)][k] for r in shuffled_by_n[n]) for n in with_shuffled], "rx:",
                    label="shuffled labels")  # fmt: skip
        ax.axhline(control_mean[k], color="grey", ls="--", lw=1, label="untrained adapter")
        top = max(n - 1 for n in ns)
        ax.plot([0, min(top, r)], [0, min(top, r)], color="black", ls=":", lw=0.8, label="rank = n − 1")
        ax.axhline(r, color="black", lw=0.6, alpha=0.4, label=f"r = {r}")
        ax.set(xlabel="n − 1", ylabel=f"energy rank ({k}, mean over layers)", title=f"{k} vs n − 1 (r = {r})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, outdir / "energy_rank_vs_classes.png")

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for n in ns:
        for kind, style in (("full", "-"), ("lora", "--")):
            runs = [f if kind == "full" else lo for f, lo in by_n[n]]
            steps = [h["step"] for h in runs[0]["eval_history"]]
            if all([h["step"] for h in r["eval_history"]] == steps for r in runs) and len(steps) > 1:
                means = [statistics.fmean(r["eval_history"][i]["accuracy"] for r in runs) for i in range(len(steps))]
                ax.plot(steps, means, style, label=f"n={n} {kind}")
        snap_runs = [lo for _, lo in by_n[n] if lo.get("snapshots")]
        if snap_runs:
            steps = [s["step"] for s in snap_runs[0]["snapshots"]]
            means = [statistics.fmean(_snapshot_mean(r["snapshots"][i]) for r in snap_runs) for i in range(len(steps))]
            ax2.plot(steps, means, marker=".", label=f"n={n}")
    ax.set(xlabel="training step", ylabel="eval accuracy (mean over subsets)", title="Accuracy during training")
    ax2.set(xlabel="training step", ylabel="mean energy rank (all adapters)", title="Energy rank during training")
    for axis, fontsize, ncol in ((ax, 6, 2), (ax2, 7, 1)):
        if axis.get_lines():
            axis.legend(fontsize=fontsize, ncol=ncol)
        else:  # runs evaluated or snapshotted once: no curve to draw
            axis.text(0.5, 0.5, "one point per run: no curve", ha="center", va="center", transform=axis.transAxes)
    save_figure(fig, outdir / "training_curves.png")
