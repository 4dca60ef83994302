"""Per-layer LoRA rank allocation.

``strategies`` holds the pure rules (target modules → ``rank_pattern``): uniform, linear decay, attention-heavy,
empirical thirds, per-layer lists, warm-up importance scores → ranks, and energy-guided budget fitting.
``measure`` looks at a model: ``find_targets``, the gradient / weight-change measurements, ``resize_adapters`` and
``reallocate``, the probe → score → resize protocol in one call. ``suggest_ranks`` answers the question before any
of that: which rank does this task need? (a short probe at a generous rank, then the adapters' energy ranks)::

    model = lora_fast.inject(model, ["query", "key", "value"], r=8)
    done = reallocate(model, probe=lambda m: train(m, data, None, TrainConfig(max_steps=20)), method="energy")
    done.pattern            # new rank per module, same parameter budget as r=8; the model is resized in place

    hint = suggest_ranks(model, data, ["query", "key", "value"], modules_to_save=["classifier"])
    hint.rank, hint.rank_pattern, print(hint.evidence())
"""

from __future__ import annotations

from lora_fast.allocation.measure import Reallocation
from lora_fast.allocation.measure import adapter_targets
from lora_fast.allocation.measure import find_targets
from lora_fast.allocation.measure import gradient_norms
from lora_fast.allocation.measure import reallocate
from lora_fast.allocation.measure import resize_adapters
from lora_fast.allocation.measure import warmup_importance
from lora_fast.allocation.measure import weight_changes
from lora_fast.allocation.strategies import RankPattern
from lora_fast.allocation.strategies import TargetModule
from lora_fast.allocation.strategies import attention_heavy
from lora_fast.allocation.strategies import empirical
from lora_fast.allocation.strategies import energy_guided
from lora_fast.allocation.strategies import fit_budget
from lora_fast.allocation.strategies import from_layer_list
from lora_fast.allocation.strategies import importance_scores
from lora_fast.allocation.strategies import is_attention
from lora_fast.allocation.strategies import linear_decay
from lora_fast.allocation.strategies import load_layer_list
from lora_fast.allocation.strategies import lora_param_count
from lora_fast.allocation.strategies import num_layers
from lora_fast.allocation.strategies import scores_to_ranks
from lora_fast.allocation.strategies import uniform
from lora_fast.allocation.suggest import RankSuggestion
from lora_fast.allocation.suggest import round_rank
from lora_fast.allocation.suggest import suggest_ranks

__all__ = [
    "RankPattern",
    "RankSuggestion",
    "Reallocation",
    "TargetModule",
    "adapter_targets",
    "attention_heavy",
    "empirical",
    "energy_guided",
    "find_targets",
    "fit_budget",
    "from_layer_list",
    "gradient_norms",
    "importance_scores",
    "is_attention",
    "linear_decay",
    "load_layer_list",
    "lora_param_count",
    "num_layers",
    "reallocate",
    "resize_adapters",
    "round_rank",
    "scores_to_ranks",
    "suggest_ranks",
    "uniform",
    "warmup_importance",
    "weight_changes",
]
