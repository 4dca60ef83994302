"""Study 3: energy rank of LoRA adapters as a fraction p of the training labels is shuffled.

One class subset of ``num_classes`` classes per repeat (repeat i uses subset i), LoRA on ``lora.targets`` for every p
of ``noise``, trained long enough to memorise the shuffled labels (the mechanism the study proposes): each run
reports its accuracy on the labels it was trained on and the share of relabelled examples it predicts with their
wrong label. The unit is a run; energy ranks are averaged over layers within a run. Two estimates of the trend: a
line over all runs, and (with 2+ repeats) each repeat's own slope over p, averaged, whose interval removes the
difference between class subsets. The study found weaker but positive trends of energy rank with p.
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
from experiments.runner.analysis import mean_interval
from experiments.runner.analysis import sign_verdict
from experiments.runner.config import ConfigError
from experiments.runner.config import LoraSettings
from experiments.runner.config import ModelSettings
from experiments.runner.config import SweepConfig
from experiments.runner.context import RunContext
from experiments.runner.report import fmt
from experiments.runner.report import fmt_ci
from experiments.runner.report import markdown_table
from experiments.runner.report import pyplot
from experiments.runner.report import save_figure
from experiments.runner.spec import RunSpec
from experiments.runner.store import atomic_write_text
from experiments.studies._classification import ClassificationTask
from experiments.studies._classification import check_train_size
from experiments.studies._classification import clipart_options
from experiments.studies._classification import eligible_count
from experiments.studies._classification import run_classification
from experiments.studies._classification import run_params
from experiments.studies._classification import vit_model

NAME = "label_noise"


def _memorising_lora() -> LoraSettings:
    # 128 examples seen 19 times: measured, r=32 adapters fit every relabelled example at p = 0.25 and 0.5 within
    # 200 steps, with test accuracy flat over the last quarter; 152 keeps the default inside its 15 minutes (evals at
    # each quarter: 38, 76, 114, 152)
    return LoraSettings(targets=["query", "key", "value"], r=32, alpha=64.0, lr=4e-3, max_steps=152, batch_size=16,
                        eval_every=38)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Config(ClassificationTask):
    """Study 3's settings.

    Args:
        num_classes: classes of every run.
        noise: label-noise fractions p (each in [0, 1]).
        repeats: class subsets (one set of runs over ``noise`` each).
    """

    train_size: int = 128
    lora: LoraSettings = dataclasses.field(default_factory=_memorising_lora)
    num_classes: int = 8
    noise: tuple[float, ...] = (0.0, 0.25, 0.5)
    repeats: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_classes < 2:
            raise ConfigError(f"num_classes must be >= 2, got {self.num_classes}")
        if not self.noise or any(not 0 <= p <= 1 for p in self.noise):
            raise ConfigError(f"noise must be a non-empty list of fractions in [0, 1], got {list(self.noise)}")
        if self.repeats < 1:
            raise ConfigError(f"repeats must be >= 1, got {self.repeats}")


def _memorising_vit_lora() -> LoraSettings:
    # 120 images seen 16 times: measured on the 2-core CPU, r=32 fits 98% of the relabelled images at p = 0.5 in 120
    # steps (34 CPU-s in bf16); evals at each quarter
    return LoraSettings(targets=["query", "key", "value"], r=32, alpha=64.0, lr=2e-3, max_steps=120, batch_size=16,
                        eval_every=30)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class VitConfig(Config):
    """Study 3 on the ViT: label noise on 8 clip-art sub-categories (DINOv2 ViT-S/14 tuned for saliency, 56 px).

    120 training images (15 per class of the 30 a 40-image class keeps for training), up to 10 held-out images per
    class for evaluation.
    """

    dataset: str = "clipart"
    dataset_options: dict[str, Any] = dataclasses.field(default_factory=clipart_options)
    test_fraction: float = 0.25
    min_per_class: int = 40
    train_size: int = 120
    eval_size: int = 80
    model: ModelSettings = dataclasses.field(default_factory=vit_model)
    lora: LoraSettings = dataclasses.field(default_factory=_memorising_vit_lora)
    noise: tuple[float, ...] = (0.0, 0.5)
    repeats: int = 2


def plan(config: SweepConfig, name: str = NAME) -> list[RunSpec]:
    """A LoRA run per (noise p, repeat)."""
    section = config.section(name)
    t = eligible_count(section)
    if not 2 <= section.num_classes <= t:
        raise ConfigError(f"{name}: num_classes {section.num_classes} outside 2..{t}")
    check_train_size(section, section.num_classes, name)
    subsets = min(section.repeats, math.comb(t, section.num_classes))
    return [
        RunSpec.make(name, f"noise{round(100 * p):03d}-n{section.num_classes:02d}-s{rep}",
                     run_params(section, "lora", section.num_classes, rep, subsets, float(p), config.seed))
        for rep in range(subsets)
        for p in section.noise
    ]  # fmt: skip


def execute(spec: RunSpec, ctx: RunContext) -> dict[str, Any]:
    """Train and analyse one run (see ``_classification.run_classification``)."""
    return run_classification(spec.params, ctx)


def report(rows: list[dict[str, Any]], config: SweepConfig, outdir: Path, name: str = NAME) -> str:
    """Table ``energy_rank_vs_noise.md`` and plot ``energy_rank_vs_label_noise.png``."""
    outdir.mkdir(parents=True, exist_ok=True)
    if not rows:
        return f"### {name}\n\nno finished runs yet.\n"
    section = config.section(name)
    kinds = sorted({a["kind"] for r in rows for a in r["adapters"]})
    ps = sorted({r["params"]["noise"] for r in rows})
    rank = {id(r): kind_means(r["adapters"]) for r in rows}
    by_p: dict[float, list[dict]] = defaultdict(list)
    by_rep: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        by_p[r["params"]["noise"]].append(r)
        by_rep[r["params"]["subset"]].append(r)

    def cell(values: list[float], digits: int = 3) -> str:
        m, h = mean_ci(values)
        return fmt_ci(m, m - h, m + h, digits)

    table = "## Per noise level p (mean [95% CI] over repeats; energy rank averaged over layers within a run)\n\n"
    table += markdown_table(
        ["p", "runs", "wrong labels", "train accuracy (noisy labels)", "relabelled examples memorised",
         "test accuracy", *[f"energy rank {k}" for k in kinds]],
        [[p, len(by_p[p]), statistics.fmean(r["noisy_fraction"] for r in by_p[p]),
          cell([r["train_accuracy"] for r in by_p[p]]),
          cell([r["memorised_fraction"] for r in by_p[p]]) if all(r["memorised_fraction"] is not None for r in by_p[p])
          else "n/a", cell([r["accuracy"] for r in by_p[p]]), *[cell([rank[id(r)][k] for r in by_p[p]], 2)
                                                                for k in kinds]] for p in ps],
    )  # fmt: skip
    ps_rows = [r["params"]["noise"] for r in rows]
    fits = {k: fit_line(ps_rows, [rank[id(r)][k] for r in rows]) for k in kinds}
    fits["accuracy"] = fit_line(ps_rows, [r["accuracy"] for r in rows])
    paired = {}
    if len(by_rep) >= 2 and len(ps) >= 2:
        for k in kinds:
            slopes = [fit_line([r["params"]["noise"] for r in reps], [rank[id(r)][k] for r in reps])["slope"]
                      for reps in by_rep.values() if len({r["params"]["noise"] for r in reps}) >= 2]  # fmt: skip
            paired[k] = mean_interval([s for s in slopes if math.isfinite(s)])
    table += "\n## Trend with p (line over runs: value = slope·p + intercept, 95% CI)\n\n"
    table += markdown_table(
        ["quantity", "slope [95% CI]", "intercept [95% CI]", "R²", "runs", "smallest |slope| the CI excludes 0 at",
         "vs study"],
        [[k if k == "accuracy" else f"energy rank {k}", fmt_ci(f["slope"], f["slope_lo"], f["slope_hi"]),
          fmt_ci(f["intercept"], f["intercept_lo"], f["intercept_hi"]), f["r2"], f["n"], fmt(ci_halfwidth(f)),
          "(falls)" if k == "accuracy" else f"{sign_verdict(f, +1)} (study: positive)"] for k, f in fits.items()],
    )  # fmt: skip
    if paired:
        table += "\n## Within-subset trend (each repeat's slope over p; mean [95% CI] over repeats)\n\n"
        table += markdown_table(
            ["matrix", "slope [95% CI]", "repeats", "vs study (positive)"],
            [[k, fmt_ci(t["slope"], t["slope_lo"], t["slope_hi"]), t["n"], sign_verdict(t, +1)]
             for k, t in paired.items()],
        )  # fmt: skip
    atomic_write_text(outdir / "energy_rank_vs_noise.md", table)

    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    for k in kinds:
        stats = [mean_ci([rank[id(r)][k] for r in by_p[p]]) for p in ps]
        line = ax.errorbar(ps, [m for m, _ in stats], yerr=[0 if math.isnan(h) else h for _, h in stats], marker="o",
                           capsize=3, label=k)  # fmt: skip
        control = [a["control_energy_rank"] for r in rows for a in r["adapters"] if a["kind"] == k and
                   "control_energy_rank" in a]  # fmt: skip
        if control:
            ax.axhline(statistics.fmean(control), ls="--", lw=1, alpha=0.6, color=line[0].get_color(),
                       label=f"{k} untrained")  # fmt: skip
    ax.set(xlabel="label noise p", ylabel="energy rank (mean over layers)", title="Energy rank vs label noise")
    ax.legend(fontsize=7)
    ax2.plot(ps, [statistics.fmean(r["accuracy"] for r in by_p[p]) for p in ps], "o-", label="test (clean labels)")
    ax2.plot(ps, [statistics.fmean(r["train_accuracy"] for r in by_p[p]) for p in ps], "s--",
             label="train (labels trained on)")  # fmt: skip
    ax2.set(xlabel="label noise p", ylabel="accuracy", title="Accuracy vs label noise")
    ax2.legend(fontsize=8)
    save_figure(fig, outdir / "energy_rank_vs_label_noise.png")

    top = max(ps)
    memorised = [r["memorised_fraction"] for r in by_p[top] if r["memorised_fraction"] is not None]
    lines = [f"### {name}: {section.num_classes} classes, p in {ps}, {len(by_rep)} repeat(s), {len(rows)} LoRA runs, "
             f"{section.train_size} training examples, {section.lora['max_steps']} steps", ""]  # fmt: skip
    lines += [
        f"- energy rank of {k} vs p: slope {fmt_ci(f['slope'], f['slope_lo'], f['slope_hi'], 2)} over runs "
        f"({sign_verdict(f, +1)}; study: weaker, positive); CI excludes 0 only for |slope| > {ci_halfwidth(f):.2f}"
        + (f"; within subsets {fmt_ci(paired[k]['slope'], paired[k]['slope_lo'], paired[k]['slope_hi'], 2)}"
           if k in paired else "")
        for k, f in fits.items()
        if k != "accuracy"
    ]  # fmt: skip
    changes = [c for c in (last_quarter_change(r["eval_history"], "accuracy") for r in rows) if math.isfinite(c)]
    settled = ""
    if changes:
        mean, half = mean_ci(changes)
        settled = f"; test accuracy moved {fmt_ci(mean, mean - half, mean + half)} over the last quarter of training"
    lines.append(
        f"- test accuracy vs p: slope {fits['accuracy']['slope']:.3f}, R² {fits['accuracy']['r2']:.2f}{settled}"
    )
    lines.append(
        f"- memorisation at p = {top}: train accuracy on the noisy labels "
        f"{statistics.fmean(r['train_accuracy'] for r in by_p[top]):.3f}"
        + (f", relabelled examples predicted with their wrong label {statistics.fmean(memorised):.3f}" if memorised
           else "")
    )  # fmt: skip
    return "\n".join(lines) + "\n"
