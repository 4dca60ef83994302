"""Suggest LoRA ranks for a task before training it: a short probe at a generous rank, then each adapter's energy rank.

``suggest_ranks`` trains a copy of the model (the caller's model is not touched) with LoRA at ``probe_rank`` on every
target for ``probe_steps`` optimizer steps, reads the energy rank of every adapter (the smallest j whose top-j
squared singular values hold ``threshold`` of the update's energy; ``lora_fast.energy_rank``), and turns them into

- ``rank_pattern``: per module, its energy rank times ``scale``, rounded up to a power of two, within
  [``r_min``, ``r_max``] — what ``lora_fast.inject(..., rank_pattern=...)`` and PEFT's ``LoraConfig`` accept;
- ``rank``: one uniform rank, the ``quantile`` of the scaled energy ranks over modules, rounded up the same way.

The evidence comes with it: every module's energy rank, the modules whose energy rank reached the probe rank (the
measurement was capped there: probe again with a larger ``probe_rank``), the probe's metrics and its cost.

How well this predicts the rank a task needs is measured, not assumed: ``experiments/studies/rank_prediction.py``
compares the suggestion with the smallest uniform rank whose accuracy is within one seed spread of r=64, over tasks
of increasing complexity (README, "Rank needed vs rank measured"), and reports the ``scale`` that calibrates it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from lora_fast.allocation.strategies import RankPattern

__all__ = ["RankSuggestion", "round_rank", "suggest_ranks"]


def round_rank(value: float, r_min: int = 1, r_max: int | None = None) -> int:
    """``value`` rounded up to a power of two (1, 2, 4, ...), then clipped to [``r_min``, ``r_max``].

    Args:
        value: a rank estimate (> 0).
        r_min: smallest rank returned.
        r_max: largest rank returned (None: no limit).
    """
    rank = 1 << max(0, math.ceil(math.log2(max(value, 1.0)) - 1e-9))
    rank = max(r_min, rank)
    return min(rank, r_max) if r_max is not None else rank


def _quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile with linear interpolation between order statistics (q=0.5: the median)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class RankSuggestion:
    """What ``suggest_ranks`` found.

    Args:
        rank: the suggested uniform rank.
        rank_pattern: the suggested rank per module (full module names).
        energy_ranks: every adapter's energy rank after the probe.
        uniform_estimate: the ``quantile`` of the scaled energy ranks before rounding (the continuous prediction).
        probe_rank: the rank the probe trained at.
        probe_steps: the probe's optimizer steps.
        threshold: the energy share of the energy rank.
        quantile: which quantile over modules gives ``rank``.
        scale: the factor the energy ranks were multiplied by before rounding.
        capped: modules whose energy rank reached ``probe_rank`` (their need may be larger).
        probe_metrics: the probe's ``TrainResult`` fields accuracy, eval_loss, final train loss, steps, precision.
        seconds: wall time of the probe and the analysis.
    """

    rank: int
    rank_pattern: RankPattern
    energy_ranks: dict[str, int]
    uniform_estimate: float
    probe_rank: int
    probe_steps: int
    threshold: float
    quantile: float
    scale: float
    capped: list[str]
    probe_metrics: dict[str, Any]
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return dataclasses.asdict(self)

    def evidence(self) -> str:
        """A few lines a user can read: the suggestion, the spread of the energy ranks and what limits it."""
        values = list(self.energy_ranks.values())
        lines = [
            f"suggested uniform rank {self.rank} (the {self.quantile:g} quantile of {len(values)} adapters' energy "
            f"ranks x {self.scale:g} = {self.uniform_estimate:.1f}, rounded up to a power of two)",
            f"energy ranks at {self.threshold:g} of the energy after a {self.probe_steps}-step probe at r = "
            f"{self.probe_rank}: min {min(values)}, median {statistics.median(values):g}, max {max(values)}",
            f"rank_pattern: {len(self.rank_pattern)} modules, ranks {sorted(set(self.rank_pattern.values()))}",
        ]
        if self.capped:
            first = self.capped[0]
            lines.append(f"{len(self.capped)} adapter(s) reached the probe rank {self.probe_rank} (e.g. {first}): "
                         "their need may be larger; probe again with a larger probe_rank")  # fmt: skip
        accuracy = self.probe_metrics.get("accuracy")
        if accuracy is not None:
            lines.append(f"probe accuracy {accuracy:.3f} ({self.probe_metrics.get('eval_split', 'eval')} data)")
        return "\n".join(lines)


def suggest_ranks(
    model: nn.Module,
    data: Any,
    target_modules: str | Sequence[str],
    *,
    eval_data: Any = None,
    tokenizer: Any = None,
    train_config: Any = None,
    probe_rank: int = 64,
    probe_steps: int = 24,
    alpha: float | None = None,
    threshold: float = 0.95,
    quantile: float = 0.5,
    scale: float = 1.0,
    r_min: int = 1,
    r_max: int | None = None,
    modules_to_save: str | Sequence[str] | None = None,
) -> RankSuggestion:
    """Probe a copy of ``model`` with LoRA at ``probe_rank`` for ``probe_steps`` steps and suggest ranks from its
    adapters' energy ranks (see the module docstring).

    The probe uses rank-stabilised scaling (``alpha / sqrt(r)``), so how fast it learns does not depend on
    ``probe_rank``; ``alpha`` defaults to ``2 * sqrt(32)`` (the update scale of r = 32 at alpha = 64).

    Args:
        model: the base model (not modified: the probe trains a deep copy).
        data: training data for ``lora_fast.train.train`` (``ClassificationData`` or texts for a causal LM).
        target_modules: modules that get adapters (``lora_fast.inject`` semantics).
        eval_data: evaluation data of the probe (None: its metrics are measured on ``data``).
        tokenizer: for text data.
        train_config: a ``lora_fast.train.TrainConfig`` for the probe (learning rate, batch size, precision, ...);
            its ``max_steps`` is replaced by ``probe_steps`` and its ``energy_threshold`` by ``threshold``.
        probe_rank: rank of every probe adapter; energy ranks cannot exceed it.
        probe_steps: optimizer steps of the probe.
        alpha: LoRA alpha of the probe (rsLoRA scaling).
        threshold: energy share of the energy rank, in (0, 1].
        quantile: which quantile of the adapters' energy ranks gives the uniform ``rank`` (0.5: median; 1: max).
        scale: multiply the energy ranks by this before rounding (a calibration; 1 = the energy rank itself).
        r_min: smallest suggested rank.
        r_max: largest suggested rank (default ``probe_rank``).
        modules_to_save: modules trained fully during the probe (e.g. ``["classifier"]``).

    Raises:
        ValueError: a setting out of range, or the model has no module matching ``target_modules``.
    """
    from lora_fast.injection import inject
    from lora_fast.train import TrainConfig
    from lora_fast.train import train

    if probe_rank < 1 or probe_steps < 1:
        raise ValueError(f"probe_rank and probe_steps must be >= 1, got {probe_rank} and {probe_steps}")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if not 0 <= quantile <= 1:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be a positive number, got {scale}")
    r_max = probe_rank if r_max is None else r_max
    if not 1 <= r_min <= r_max:
        raise ValueError(f"need 1 <= r_min <= r_max, got r_min={r_min}, r_max={r_max}")
    config = train_config if train_config is not None else TrainConfig(progress=False)
    config = dataclasses.replace(config, max_steps=probe_steps, energy_threshold=threshold)
    start = time.perf_counter()
    probe = inject(copy.deepcopy(model), target_modules, r=probe_rank,
                   alpha=alpha if alpha is not None else 2 * math.sqrt(32), use_rslora=True,
                   modules_to_save=modules_to_save)  # fmt: skip
    result = train(probe, data, eval_data, config, tokenizer)
    energy = {a["name"]: int(a["energy_rank"]) for a in result.adapters}
    scaled = {name: scale * e for name, e in energy.items()}
    estimate = _quantile(list(scaled.values()), quantile)
    metrics = {"accuracy": result.accuracy, "eval_loss": result.eval_loss, "steps": result.steps,
               "final_train_loss": result.train_loss[-1] if result.train_loss else None,
               "precision": result.precision, "eval_split": result.eval_split}  # fmt: skip
    return RankSuggestion(
        rank=round_rank(estimate, r_min, r_max),
        rank_pattern={name: round_rank(v, r_min, r_max) for name, v in scaled.items()},
        energy_ranks=energy,
        uniform_estimate=estimate,
        probe_rank=probe_rank,
        probe_steps=probe_steps,
        threshold=threshold,
        quantile=quantile,
        scale=scale,
        capped=[name for name, e in energy.items() if e >= probe_rank],
        probe_metrics=metrics,
        seconds=time.perf_counter() - start,
    )
