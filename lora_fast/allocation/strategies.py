"""Per-layer LoRA rank allocation strategies: pure functions from target modules to a ``rank_pattern``.

A ``rank_pattern`` is a dict from full module name to rank, which ``lora_fast.inject`` and PEFT's
``LoraConfig(rank_pattern=...)`` both accept (PEFT matches a key ``k`` against a module name ``m`` with
``re.match(rf"(.*\\.)?({k})$", m)``; a full module name matches only itself). Strategies:

* ``uniform`` — the same rank everywhere.
* ``linear_decay`` — rank interpolated linearly over depth (16 → 4 by default).
* ``attention_heavy`` — a high rank on attention projections, a low rank elsewhere.
* ``empirical`` — early/middle/late thirds of the depth get 60% / 120% / 100% of a base rank.
* ``from_layer_list`` / ``load_layer_list`` — a per-layer list of ranks, e.g. from a JSON file.
* ``importance_scores`` + ``scores_to_ranks`` — α·normalised gradient norm + β·normalised weight change, mapped
  linearly to [r_min, r_max] (``lora_fast.allocation.measure`` measures the two terms on a model).
* ``energy_guided`` — ranks proportional to each module's energy rank after a probe run, fitted to a parameter
  budget (by default that of uniform r=8) with ``fit_budget``.

Nothing here touches a model: ``lora_fast.allocation.measure`` finds the targets, measures, and resizes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "RankPattern",
    "TargetModule",
    "attention_heavy",
    "empirical",
    "energy_guided",
    "fit_budget",
    "from_layer_list",
    "importance_scores",
    "is_attention",
    "linear_decay",
    "load_layer_list",
    "lora_param_count",
    "num_layers",
    "scores_to_ranks",
    "uniform",
]

RankPattern = dict[str, int]


@dataclass(frozen=True)
class TargetModule:
    """One linear layer that receives a LoRA adapter.

    Args:
        name: full module name in the model, e.g. ``bert.encoder.layer.3.attention.self.query``.
        layer: index of the transformer block it sits in (first integer in the name), -1 outside any block.
        kind: the target key it matched, e.g. ``query`` or ``q_proj``.
        in_features: k of the (n, k) weight.
        out_features: n of the (n, k) weight.
    """

    name: str
    layer: int
    kind: str
    in_features: int
    out_features: int

    def params_per_rank(self) -> int:
        """Parameters one unit of rank costs: a row of A (k) plus a column of B (n)."""
        return self.in_features + self.out_features


def num_layers(targets: Sequence[TargetModule]) -> int:
    """Number of transformer blocks the targets span (highest block index + 1)."""
    return max(t.layer for t in targets) + 1


def lora_param_count(targets: Sequence[TargetModule], pattern: Mapping[str, int]) -> int:
    """Trainable LoRA parameters of ``pattern``: Σ r·(k + n) over the targets.

    Args:
        targets: from ``find_targets``.
        pattern: rank per full module name.
    """
    return sum(pattern[t.name] * t.params_per_rank() for t in targets)


def is_attention(name: str) -> bool:
    """True for attention projections: a name segment contains ``attn`` or ``attention`` (BERT, LLaMA, GPT-2, ViT).

    Args:
        name: full module name.
    """
    return any("attn" in part or "attention" in part for part in name.split("."))


def _depth(target: TargetModule, layers: int) -> float:
    """Relative depth in [0, 1] of the block centre: block i of L sits at (i + 0.5) / L."""
    return (max(target.layer, 0) + 0.5) / layers


def uniform(targets: Sequence[TargetModule], r: int = 8) -> RankPattern:
    """The same rank ``r`` for every target.

    Args:
        targets: from ``find_targets``.
        r: the rank.
    """
    return {t.name: r for t in targets}


def linear_decay(targets: Sequence[TargetModule], r_first: int = 16, r_last: int = 4) -> RankPattern:
    """Rank interpolated linearly from ``r_first`` at the first block to ``r_last`` at the last, rounded.

    Args:
        targets: from ``find_targets``.
        r_first: rank of the first block.
        r_last: rank of the last block.
    """
    span = max(num_layers(targets) - 1, 1)
    return {t.name: max(1, round(r_first + (r_last - r_first) * max(t.layer, 0) / span)) for t in targets}


def attention_heavy(targets: Sequence[TargetModule], r_attention: int = 16, r_other: int = 4) -> RankPattern:
    """``r_attention`` on attention projections (``is_attention``), ``r_other`` on every other target.

    Args:
        targets: from ``find_targets``.
        r_attention: rank of attention projections.
        r_other: rank of the remaining (MLP) targets.
    """
    return {t.name: r_attention if is_attention(t.name) else r_other for t in targets}


def empirical(
    targets: Sequence[TargetModule], r: int = 8, fractions: tuple[float, float, float] = (0.6, 1.2, 1.0)
) -> RankPattern:
    """Early, middle and late thirds of the depth get ``fractions`` of the base rank ``r`` (rounded, >= 1).

    Args:
        targets: from ``find_targets``.
        r: base rank.
        fractions: multipliers of ``r`` for the early, middle and late third.
    """
    layers = num_layers(targets)
    return {t.name: max(1, round(r * fractions[min(int(_depth(t, layers) * 3), 2)])) for t in targets}


def from_layer_list(targets: Sequence[TargetModule], ranks: Sequence[int]) -> RankPattern:
    """Rank ``ranks[i]`` for every target in block ``i``.

    Args:
        targets: from ``find_targets``.
        ranks: one positive rank per block.
    """
    layers = num_layers(targets)
    if len(ranks) != layers or any(int(r) < 1 for r in ranks):
        raise ValueError(f"need {layers} positive per-layer ranks, got {list(ranks)}")
    return {t.name: int(ranks[max(t.layer, 0)]) for t in targets}


def load_layer_list(targets: Sequence[TargetModule], path: str | Path) -> RankPattern:
    """``from_layer_list`` with the ranks read from a JSON file: a list, or an object with a ``ranks`` list.

    Args:
        targets: from ``find_targets``.
        path: the JSON file.
    """
    data = json.loads(Path(path).read_text())
    return from_layer_list(targets, data["ranks"] if isinstance(data, dict) else data)


def _normalise(values: Mapping[str, float]) -> dict[str, float]:
    top = max(values.values())
    return {k: (v / top if top > 0 else 0.0) for k, v in values.items()}


def importance_scores(
    grad_norms: Mapping[str, float], changes: Mapping[str, float], alpha: float = 0.5, beta: float = 0.5
) -> dict[str, float]:
    """score = α·g/max(g) + β·c/max(c) per module.

    Args:
        grad_norms: gradient norm per module (``gradient_norms``).
        changes: weight change per module (``weight_changes``).
        alpha: weight of the gradient term.
        beta: weight of the weight-change term.
    """
    g, c = _normalise(grad_norms), _normalise(changes)
    return {k: alpha * g[k] + beta * c[k] for k in grad_norms}


def scores_to_ranks(scores: Mapping[str, float], r_min: int = 4, r_max: int = 16) -> RankPattern:
    """Map scores linearly so the lowest gets ``r_min`` and the highest ``r_max`` (rounded).

    Args:
        scores: score per module name.
        r_min: rank of the lowest score.
        r_max: rank of the highest score.
    """
    low, high = min(scores.values()), max(scores.values())
    span = high - low
    return {k: round(r_min + (r_max - r_min) * ((s - low) / span if span > 0 else 0.5)) for k, s in scores.items()}


def fit_budget(
    targets: Sequence[TargetModule],
    weights: Mapping[str, float],
    budget: int,
    r_min: int = 1,
    r_max: int = 64,
) -> RankPattern:
    """Ranks proportional to ``weights`` (r_i ≈ c·w_i, clipped to [r_min, r_max]) with the largest c whose
    parameter count Σ r_i·(k_i + n_i) stays within ``budget``; leftover budget then goes one rank at a time to
    the modules furthest below c·w_i.

    Args:
        targets: from ``find_targets``.
        weights: non-negative weight per module name (e.g. energy rank).
        budget: parameter budget, e.g. ``lora_param_count(targets, uniform(targets, 8))``.
        r_min: smallest rank any module gets.
        r_max: largest rank any module gets.
    """
    floor_cost = sum(r_min * t.params_per_rank() for t in targets)
    if floor_cost > budget:
        raise ValueError(f"budget {budget} is below r_min={r_min} everywhere ({floor_cost} parameters)")

    def ranks_at(c: float) -> RankPattern:
        return {t.name: min(r_max, max(r_min, math.floor(c * weights[t.name]))) for t in targets}

    top = max(weights.values())
    if top <= 0:
        raise ValueError("all allocation weights are zero")
    low, high = 0.0, (r_max + 1) / top
    for _ in range(60):  # bisection on c; 60 halvings reach float resolution
        mid = (low + high) / 2
        if lora_param_count(targets, ranks_at(mid)) <= budget:
            low = mid
        else:
            high = mid
    ranks = ranks_at(low)
    left = budget - lora_param_count(targets, ranks)
    for t in sorted(targets, key=lambda t: ranks[t.name] - low * weights[t.name]):
        if ranks[t.name] < r_max and t.params_per_rank() <= left:
            ranks[t.name] += 1
            left -= t.params_per_rank()
    return ranks


def energy_guided(
    targets: Sequence[TargetModule],
    energy_ranks: Mapping[str, float],
    budget_rank: int = 8,
    r_min: int = 2,
    r_max: int = 32,
) -> RankPattern:
    """Ranks proportional to each module's energy rank from a probe run, under uniform ``budget_rank``'s
    parameter budget.

    Args:
        targets: from ``find_targets``.
        energy_ranks: energy rank per module name (``lora_fast.energy_rank.analyze`` records).
        budget_rank: the uniform rank whose parameter count is the budget.
        r_min: smallest rank (2: a module whose probe update was rank-1 still gets room to grow).
        r_max: largest rank.
    """
    budget = lora_param_count(targets, uniform(targets, budget_rank))
    return fit_budget(targets, energy_ranks, budget, r_min, r_max)
