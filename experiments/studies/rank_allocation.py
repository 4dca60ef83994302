"""Per-layer LoRA rank allocation strategies on a text classifier, at equal step budgets.

Nine strategies (uniform r=8/16, linear decay, attention-heavy, empirical thirds, a per-layer list, warm-up
importance, PEFT's AdaLoRA, energy-rank guided) on the same data; accuracy, macro-F1, real ranks and costs per seed,
with the seed-spread tie rule. The protocol is shared with the causal-LM study (``_allocation``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from experiments.runner.config import ConfigError
from experiments.runner.config import SweepConfig
from experiments.runner.context import RunContext
from experiments.runner.spec import RunSpec
from experiments.studies import _allocation

NAME = "rank_allocation"


@dataclasses.dataclass(frozen=True)
class Config(_allocation.AllocationSettings):
    """``AllocationSettings`` plus the classification data (6-layer MiniLM, 8 WordNet classes by default).

    Args:
        dataset: a corpus of ``experiments.data.DATASETS``.
        test_fraction: share of each class held out as the evaluation pool.
        min_per_class: only classes with at least this many examples are drawn.
        n_classes: classes of the task (one subset, drawn from the global seed).
    """

    dataset: str = "wordnet"
    test_fraction: float = 0.2
    min_per_class: int = 500
    n_classes: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        from experiments.data import DATASETS

        if self.dataset not in DATASETS:
            raise ConfigError(f"dataset: unknown {self.dataset!r}; available: {', '.join(sorted(DATASETS))}")
        if self.n_classes < 2:
            raise ConfigError(f"n_classes must be >= 2, got {self.n_classes}")


def plan(config: SweepConfig, name: str = NAME) -> list[RunSpec]:
    """One run per (strategy, seed)."""
    return _allocation.plan_runs(config, name, "classification")


def execute(spec: RunSpec, ctx: RunContext) -> dict[str, Any]:
    """Train one (strategy, seed) run (``_allocation.execute``)."""
    return _allocation.execute(spec, ctx)


def report(rows: list[dict[str, Any]], config: SweepConfig, outdir: Path, name: str = NAME) -> str:
    """Accuracy table, efficiency frontier and per-layer ranks (``_allocation.report_runs``)."""
    return _allocation.report_runs(rows, config.section(name), outdir, name)
