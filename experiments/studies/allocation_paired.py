"""Rank allocation at equal parameter budget, with enough seeds to decide: energy guidance against uniform ranks,
linear decay, warm-up importance (gradient and weight-change scores) and AdaLoRA.

Every strategy trains the LoRA parameter budget of uniform r = 8 (``match_budget``: linear decay and the warm-up
scores are refitted to it keeping their shape; energy guidance is fitted to it by construction; AdaLoRA prunes 12
to an average of 8 ranks, so its budget is equal in ranks and its real parameter count is reported). The seeds
vary training (adapter initialisation, head, batch order) on fixed data, and every strategy sees the same seeds, so
the comparison is paired: per seed, energy-guided accuracy minus the other strategy's.

Statistics: the unit is a seed. For each comparison, the mean paired difference with its 95% t interval, the
standard deviation of the differences, the smallest difference this many seeds detects (80% power, two-sided 5%),
and how many seeds a ``difference`` (2 accuracy points) needs at the measured spread. Calls: ``wins`` / ``loses``
when the interval excludes 0; ``ties`` when it lies within ±``difference``; ``inconclusive`` otherwise.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from experiments.runner.analysis import detectable_difference
from experiments.runner.analysis import difference_verdict
from experiments.runner.analysis import mean_ci
from experiments.runner.analysis import paired_difference
from experiments.runner.analysis import units_needed
from experiments.runner.config import ConfigError
from experiments.runner.config import ModelSettings
from experiments.runner.config import SweepConfig
from experiments.runner.config import TrainSettings
from experiments.runner.context import RunContext
from experiments.runner.report import fmt_ci
from experiments.runner.report import markdown_table
from experiments.runner.report import pyplot
from experiments.runner.report import save_figure
from experiments.runner.spec import RunSpec
from experiments.runner.store import atomic_write_json
from experiments.runner.store import atomic_write_text
from experiments.studies import _allocation
from experiments.studies._classification import vit_model

NAME = "allocation_paired"
CALLS = {"better": "wins", "worse": "loses"}


@dataclasses.dataclass(frozen=True)
class Config(_allocation.ClassifierAllocation):
    """Allocation at equal budget on a text classifier: 6-layer MiniLM, 8 WordNet classes, every linear layer.

    Args:
        reference: the strategy every other is compared with.
        difference: the accuracy difference the study should separate (seeds needed are computed for it).
    """

    scale: str = ("6-layer MiniLM, 8 WordNet classes, 384 training glosses, 96 steps, LoRA on every linear layer at "
                  "uniform r=8's parameter budget")  # fmt: skip
    eval_size: int = 800
    strategies: tuple[str, ...] = ("uniform8", "linear_decay", "warmup_importance", "adalora", "energy_guided")
    # the pilot's spread of paired differences (4 seeds, SD 0.06-0.07 against the unprobed strategies) asks for
    # 64-110 seeds to resolve 2 points, ~11,000 CPU-s on 2 cores: 30 is what the budget affords (README)
    seeds: tuple[int, ...] = tuple(range(30))
    probe_steps: int = 24
    match_budget: bool = True
    train: TrainSettings = dataclasses.field(default_factory=lambda: TrainSettings(lr=3e-3, max_steps=96,
                                                                                   batch_size=16))  # fmt: skip
    reference: str = "energy_guided"
    difference: float = 0.02

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reference not in self.strategies:
            raise ConfigError(f"reference {self.reference!r} is not among strategies {list(self.strategies)}")
        if len(self.seeds) < 2:
            raise ConfigError("seeds: paired comparisons need at least two seeds")
        if not 0 < self.difference < 1:
            raise ConfigError(f"difference must be in (0, 1), got {self.difference}")


@dataclasses.dataclass(frozen=True)
class VitConfig(Config):
    """Allocation at equal budget on the ViT: DINOv2 ViT-S/14 (tuned for saliency), 10 Fashion-MNIST classes at 56 px,
    every linear layer of the 12 blocks (Fashion-MNIST: clip art's 10-image held-out pools are too small to
    resolve 2 points)."""

    scale: str = ("DINOv2 ViT-S/14 (saliency-tuned), 10 Fashion-MNIST classes at 56 px, 640 training images, 96 "
                  "steps, LoRA on every linear layer at uniform r=8's parameter budget")  # fmt: skip
    dataset: str = "fashion_mnist_rgb"
    dataset_options: dict[str, Any] = dataclasses.field(default_factory=lambda: {"size": 56, "per_class": 300})
    min_per_class: int = 300
    n_classes: int = 10
    train_size: int = 640
    eval_size: int = 600
    model: ModelSettings = dataclasses.field(default_factory=vit_model)
    targets: tuple[str, ...] = ("query", "key", "value", "attention.output.dense", "mlp.fc1", "mlp.fc2")
    # the pilot (4 seeds, SD of paired differences 0.016-0.022) asks for 8-12 seeds to resolve 2 points
    seeds: tuple[int, ...] = tuple(range(14))
    train: TrainSettings = dataclasses.field(default_factory=lambda: TrainSettings(lr=2e-3, max_steps=96,
                                                                                   batch_size=16))  # fmt: skip


def plan(config: SweepConfig, name: str = NAME) -> list[RunSpec]:
    """One run per (strategy, seed), seed by seed (a sweep stopped early holds whole seeds)."""
    return _allocation.plan_runs(config, name, "classification")


def execute(spec: RunSpec, ctx: RunContext) -> dict[str, Any]:
    """Train one (strategy, seed) run (``_allocation.execute``)."""
    return _allocation.execute(spec, ctx)


def comparisons(rows: list[dict[str, Any]], reference: str, margin: float) -> list[dict[str, Any]]:
    """Per other strategy: the paired difference reference − other over the seeds both finished, its call, the
    smallest difference these seeds detect and the seeds ``margin`` needs.

    Args:
        rows: finished runs (``strategy``, ``seed``, ``accuracy``).
        reference: the strategy compared with every other.
        margin: the difference that matters.
    """
    acc: dict[str, dict[int, float]] = defaultdict(dict)
    for r in rows:
        acc[r["strategy"]][r["seed"]] = r["accuracy"]
    out = []
    for other in acc:
        if other == reference:
            continue
        seeds = sorted(set(acc[reference]) & set(acc[other]))
        if len(seeds) < 2:
            continue
        diff = paired_difference([acc[reference][s] for s in seeds], [acc[other][s] for s in seeds])
        sd = diff["sd"]
        verdict = difference_verdict(diff, margin)
        call = CALLS.get(verdict, "ties" if verdict.startswith("equivalent") else verdict)
        out.append({"other": other, "seeds": len(seeds), "difference": diff, "call": call,
                    "detectable": detectable_difference(sd, len(seeds)),
                    "seeds_needed": units_needed(sd, margin) if sd > 0 else 2})  # fmt: skip
    return out


def report(rows: list[dict[str, Any]], config: SweepConfig, outdir: Path, name: str = NAME) -> str:
    """Tables ``strategies.md`` (+ ``comparisons.json``), ``layer_ranks.md``; plots ``paired_differences.png``,
    ``frontier.png``, ``layer_ranks.png`` (the last three of ``_allocation.report_runs``)."""
    sec = config.section(name)
    base_summary = _allocation.report_runs(rows, sec, outdir, name)
    if not rows:
        return base_summary
    found = comparisons(rows, sec.reference, sec.difference)
    by_strategy: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_strategy[r["strategy"]].append(r)
    order = [s for s in sec.strategies if s in by_strategy]

    def acc_cell(strategy: str) -> str:
        m, h = mean_ci([r["accuracy"] for r in by_strategy[strategy]])
        return fmt_ci(m, m - h, m + h, 4)

    text = f"# Allocation at equal parameter budget ({sec.scale})\n\n"
    text += (f"Accuracy over seeds (mean [95% CI]); LoRA parameters Σ r·(k+n) of the final ranks (budget: "
             f"{rows[0].get('budget_params', 'n/a')}, uniform r = {sec.energy.budget_rank}).\n\n")  # fmt: skip
    text += markdown_table(
        ["strategy", "seeds", "accuracy [95% CI]", "LoRA params", "time (s)"],
        [[s, len(by_strategy[s]), acc_cell(s), int(statistics.fmean(r["lora_params"] for r in by_strategy[s])),
          statistics.fmean(r["wall_time_s"] for r in by_strategy[s])] for s in order],
    )  # fmt: skip
    text += (f"\n## {sec.reference} vs each strategy, paired by seed (difference = {sec.reference} − other)\n\n"
             f"Calls: wins / loses when the 95% interval excludes 0; ties when it lies within ±{sec.difference:g}; "
             "else inconclusive. Detectable: the smallest true difference these seeds detect with 80% power "
             f"(two-sided 5%). Seeds needed: for ±{sec.difference:g} at the measured spread of the "
             "differences.\n\n")  # fmt: skip
    text += markdown_table(
        ["vs", "seeds", "difference [95% CI]", "SD of differences", "call", "detectable", "seeds needed"],
        [[c["other"], c["seeds"], fmt_ci(c["difference"]["slope"], c["difference"]["slope_lo"],
                                         c["difference"]["slope_hi"], 4), c["difference"]["sd"], c["call"],
          c["detectable"], c["seeds_needed"]] for c in found],
    )  # fmt: skip
    atomic_write_text(outdir / "strategies.md", text)
    atomic_write_json(outdir / "comparisons.json", {"reference": sec.reference, "margin": sec.difference,
                                                   "comparisons": found})  # fmt: skip

    if found:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 0.6 * len(found) + 1.6))
        for i, c in enumerate(found):
            d = c["difference"]
            half = (d["slope_hi"] - d["slope_lo"]) / 2
            ax.errorbar([d["slope"]], [i], xerr=[[0 if math.isnan(half) else half]], fmt="o", capsize=4)
        ax.axvspan(-sec.difference, sec.difference, color="grey", alpha=0.15, label=f"±{sec.difference:g}")
        ax.axvline(0, color="black", lw=0.8)
        ax.set(yticks=range(len(found)), yticklabels=[c["other"] for c in found],
               xlabel=f"accuracy difference, {sec.reference} − strategy (95% CI over seeds)",
               title=f"Paired by seed ({found[0]['seeds']} seeds)")  # fmt: skip
        ax.legend(fontsize=8)
        fig.tight_layout()
        save_figure(fig, outdir / "paired_differences.png")

    lines = [f"### {name}: {sec.scale}; {max(len(v) for v in by_strategy.values())} seeds", ""]
    lines += [
        f"- {sec.reference} vs {c['other']}: {c['difference']['slope']:+.4f} "
        f"[{c['difference']['slope_lo']:+.4f}, {c['difference']['slope_hi']:+.4f}] over {c['seeds']} seeds: "
        f"**{c['call']}**; detects {c['detectable']:.4f} at these seeds; ±{sec.difference:g} needs {c['seeds_needed']}"
        for c in found
    ]
    return "\n".join(lines) + "\n"
