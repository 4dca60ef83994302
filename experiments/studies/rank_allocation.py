"""Per-layer LoRA rank allocation strategies on a text classifier, at equal step budgets.

Nine strategies (uniform r=8/16, linear decay, attention-heavy, empirical thirds, a per-layer list, warm-up
importance, PEFT's AdaLoRA, energy-rank guided) on the same data; accuracy, macro-F1, real ranks and costs per seed,
with the seed-spread tie rule. The protocol is shared with the causal-LM study (``_allocation``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from experiments.runner.config import SweepConfig
from experiments.runner.context import RunContext
from experiments.runner.spec import RunSpec
from experiments.studies import _allocation

NAME = "rank_allocation"


@dataclasses.dataclass(frozen=True)
class Config(_allocation.ClassifierAllocation):
    """``ClassifierAllocation``'s settings at their defaults: 6-layer MiniLM, 8 WordNet classes, 384 training
    glosses, 36 steps, 2 seeds, nine strategies with their own budgets (linear decay and attention-heavy train more
    LoRA parameters than uniform r=8; ``allocation_paired`` compares at equal budget)."""


def plan(config: SweepConfig, name: str = NAME) -> list[RunSpec]:
    """One run per (strategy, seed)."""
    return _allocation.plan_runs(config, name, "classification")


def execute(spec: RunSpec, ctx: RunContext) -> dict[str, Any]:
    """Train one (strategy, seed) run (``_allocation.execute``)."""
    return _allocation.execute(spec, ctx)


def report(rows: list[dict[str, Any]], config: SweepConfig, outdir: Path, name: str = NAME) -> str:
    """Accuracy table, efficiency frontier and per-layer ranks (``_allocation.report_runs``)."""
    return _allocation.report_runs(rows, config.section(name), outdir, name)
