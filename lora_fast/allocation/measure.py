"""Measuring a model for allocation, and the probe → score → resize protocol as one call (``reallocate``).

``find_targets`` lists the linear layers a target list selects; ``gradient_norms`` and ``weight_changes`` measure
the two warm-up importance terms through hooks; ``resize_adapters`` gives adapters new ranks while keeping what they
learned (the truncated SVD of each update). ``reallocate`` runs a probe (any callable that trains the model briefly,
e.g. ``lora_fast.train.train`` for a few steps), scores every adapter (its energy rank, or warm-up importance), turns
the scores into ranks with a strategy of ``lora_fast.allocation.strategies`` under a parameter budget, and resizes
the adapters in place, so training continues from the probe rather than restarting.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lora_fast.allocation.strategies import RankPattern
from lora_fast.allocation.strategies import TargetModule
from lora_fast.allocation.strategies import fit_budget
from lora_fast.allocation.strategies import importance_scores
from lora_fast.allocation.strategies import lora_param_count
from lora_fast.allocation.strategies import scores_to_ranks
from lora_fast.layers import is_conv1d
from lora_fast.peft_rules import layer_index
from lora_fast.peft_rules import lora_scaling
from lora_fast.peft_rules import matches_target

__all__ = [
    "Reallocation",
    "adapter_targets",
    "find_targets",
    "gradient_norms",
    "reallocate",
    "resize_adapters",
    "warmup_importance",
    "weight_changes",
]


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    base = getattr(module, "base_layer", None)  # an already-wrapped layer (lora_fast or PEFT)
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if is_conv1d(module):  # GPT-2: weight stored (in, out)
        in_features, out_features = module.weight.shape
        return int(in_features), int(out_features)
    return None


def _block(name: str) -> int:
    """``peft_rules.layer_index`` with -1 for a module outside any block (``TargetModule.layer``'s convention)."""
    index = layer_index(name)
    return -1 if index is None else index


def find_targets(model: nn.Module, target_modules: Sequence[str]) -> list[TargetModule]:
    """The linear layers that ``target_modules`` selects, with PEFT's list semantics (name equal to a key or
    ending in ``.key``), in ``named_modules`` order. Layers already wrapped by an adapter count once.

    Args:
        model: the model (before or after injection).
        target_modules: module-name suffixes such as ``["query", "value"]`` or ``["q_proj", "v_proj"]``.
    """
    targets: list[TargetModule] = []
    for name, module in model.named_modules():
        key = next((k for k in target_modules if matches_target(name, [k])), None)
        shape = _linear_shape(module) if key is not None else None
        if shape is None:
            continue
        targets.append(TargetModule(name, _block(name), key, shape[0], shape[1]))
    if not targets:
        raise ValueError(f"no linear layer matches target_modules={list(target_modules)}")
    return targets


def adapter_targets(model: nn.Module) -> list[TargetModule]:
    """A ``TargetModule`` for every ``lora_fast.LoraLinear`` of ``model`` (kind: its name inside the block).

    Args:
        model: a model with ``lora_fast`` adapters.
    """
    targets = []
    for name, layer in _lora_layers(model).items():
        index = _block(name)
        kind = name.split(f".{index}.", 1)[-1] if index >= 0 else name
        targets.append(TargetModule(name, index, kind, layer.in_features, layer.out_features))
    return targets


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    from lora_fast.layers import LoraLinear

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def gradient_norms(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
) -> dict[str, float]:
    """‖∂L/∂W‖_F of every adapted weight W = W₀ + s·B·A, summed over ``batches`` (no optimizer step).

    The gradient of the full weight, not of A and B: right after a warm-up B is small, so ‖∂L/∂A‖ mostly measures
    B rather than how much the layer's output matters. ∂L/∂W is gᵀx over tokens, taken from hooks.

    Args:
        model: a model with ``lora_fast.LoraLinear`` layers.
        batches: keyword batches for ``model(**batch)``.
        loss_fn: maps the model output to a scalar loss; default ``output.loss``.
    """
    layers = _lora_layers(model)
    grads: dict[str, torch.Tensor | None] = dict.fromkeys(layers)
    handles = []
    for name, layer in layers.items():

        def watch(_module: nn.Module, args: tuple, output: torch.Tensor, name: str = name) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()

            def add(grad: torch.Tensor) -> None:
                dw = grad.reshape(-1, grad.shape[-1]).float().t() @ x
                grads[name] = dw if grads[name] is None else grads[name] + dw

            output.register_hook(add)

        handles.append(layer.register_forward_hook(watch))
    was_training = model.training
    model.eval()  # no dropout: measure the loss surface, not one dropout sample
    try:
        for batch in batches:
            output = model(**batch)
            loss = loss_fn(output) if loss_fn is not None else output.loss
            loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return {name: float(g.norm()) if g is not None else 0.0 for name, g in grads.items()}


@torch.no_grad()
def weight_changes(model: nn.Module) -> dict[str, float]:
    """‖s·B·A‖_F / ‖W₀‖_F per adapter: how far training moved each weight, relative to its size (B starts at 0).

    Args:
        model: a model with ``lora_fast.LoraLinear`` layers.
    """
    result = {}
    for name, layer in _lora_layers(model).items():
        base = layer.base_layer.weight.float().norm()
        result[name] = float(layer.delta_weight().norm() / base.clamp_min(1e-12))
    return result


def warmup_importance(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    alpha: float = 0.5,
    beta: float = 0.5,
    r_min: int = 4,
    r_max: int = 16,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
) -> RankPattern:
    """Ranks from warm-up importance: α·normalised ‖∂L/∂W‖ + β·normalised ‖ΔW‖/‖W‖, mapped to [r_min, r_max].

    Args:
        model: the warmed-up model with ``lora_fast.LoraLinear`` layers.
        batches: batches to measure gradients on.
        alpha: weight of the gradient term.
        beta: weight of the weight-change term.
        r_min: rank of the least important module.
        r_max: rank of the most important module.
        loss_fn: maps the model output to a scalar loss; default ``output.loss``.
    """
    scores = importance_scores(gradient_norms(model, batches, loss_fn), weight_changes(model), alpha, beta)
    return scores_to_ranks(scores, r_min, r_max)


@torch.no_grad()
def resize_adapters(model: nn.Module, pattern: Mapping[str, int]) -> None:
    """Give every ``LoraLinear`` named in ``pattern`` its new rank, keeping its current update ΔW = s·B·A.

    With ΔW = U S Vᵀ, the new factors are B = U_r √S_r / √s', A = √S_r V_rᵀ / √s' (s' the new scaling), so
    s'·B·A is ΔW truncated to rank r (exact when r ≥ rank ΔW); computed from the factors
    (``lora_fast.energy_rank.truncate``), never from the dense ΔW. Extra rows of A beyond rank ΔW are drawn fresh
    (Kaiming-uniform, as at init) with zero columns of B, so they start contributing nothing, as a new adapter does.

    Args:
        model: a model with ``lora_fast.LoraLinear`` layers.
        pattern: new rank per module name.
    """
    from lora_fast.energy_rank import truncate

    for name, layer in _lora_layers(model).items():
        r = pattern.get(name)
        if r is None or r == layer.r:
            continue
        scaling = lora_scaling(layer.lora_alpha, r, layer.use_rslora)
        keep = min(r, layer.r, layer.in_features, layer.out_features)
        # B'·A' = B·A truncated to rank `keep` (QR of the factors and an r×r SVD; ΔW is never formed); the old
        # scaling moves into the factors so that scaling·B_new·A_new = old scaling·B'·A'
        kept_a, kept_b = truncate(layer.lora_A.detach().float(), layer.lora_B.detach().float(), keep)
        factor = math.sqrt(layer.scaling / scaling)
        dtype, device = layer.lora_A.dtype, layer.lora_A.device
        new_a = torch.empty(r, layer.in_features, dtype=dtype, device=device)
        nn.init.kaiming_uniform_(new_a, a=math.sqrt(5))
        new_b = torch.zeros(layer.out_features, r, dtype=dtype, device=device)
        new_a[:keep] = (kept_a * factor).to(dtype)
        new_b[:, :keep] = (kept_b * factor).to(dtype)
        layer.lora_A = nn.Parameter(new_a, requires_grad=layer.lora_A.requires_grad)
        layer.lora_B = nn.Parameter(new_b, requires_grad=layer.lora_B.requires_grad)
        layer.r, layer.scaling = r, scaling


@dataclass
class Reallocation:
    """What ``reallocate`` did.

    Args:
        method: ``"energy"`` or ``"warmup"``.
        pattern: the new rank per module name (applied to the model).
        scores: per module, what the ranks were derived from: its energy rank after the probe, or its warm-up
            importance score.
        budget: the LoRA parameter budget Σ r·(k+n) the pattern was fitted to (``lora_param_count`` of it is
            at most this for ``"energy"``).
        probe_result: whatever the probe callable returned (e.g. a ``lora_fast.train.TrainResult``).
        scoring_time_s: seconds spent scoring and resizing (the probe excluded).
    """

    method: str
    pattern: RankPattern
    scores: dict[str, float]
    budget: int
    probe_result: Any = None
    scoring_time_s: float = 0.0


def reallocate(
    model: nn.Module,
    probe: Callable[[nn.Module], Any] | None = None,
    method: str = "energy",
    *,
    budget: int | None = None,
    r_min: int = 2,
    r_max: int = 32,
    threshold: float = 0.95,
    batches: Iterable[Mapping[str, torch.Tensor]] | None = None,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    alpha: float = 0.5,
    beta: float = 0.5,
) -> Reallocation:
    """Probe → score → resize: train briefly, score every adapter, choose per-module ranks, resize in place.

    ``method="energy"``: ranks proportional to each adapter's energy rank after the probe
    (``lora_fast.energy_rank.analyze``), fitted to ``budget`` by ``strategies.energy_guided``/``fit_budget``.
    ``method="warmup"``: score = α·normalised ‖∂L/∂W‖ (on ``batches``) + β·normalised ‖ΔW‖/‖W‖, mapped linearly to
    [r_min, r_max] (``strategies.scores_to_ranks``, as the warm-up importance rule defines it), or, when ``budget``
    is given, ranks proportional to the scores fitted to it (``fit_budget``), for comparisons at equal budget.
    Each adapter is then re-factored to its new rank from the truncated SVD of its update (``resize_adapters``),
    so what the probe learned is kept up to the truncation. Optimizer state for the old factors is meaningless
    afterwards: continue with a fresh optimizer.

    Args:
        model: a model with ``lora_fast.LoraLinear`` adapters (typically uniform rank).
        probe: trains ``model`` in place for a few steps; None when it is already trained.
        method: ``"energy"`` or ``"warmup"``.
        budget: LoRA parameter budget Σ r·(k+n); default the adapters' current count (same cost as the probe) for
            ``"energy"``; ``"warmup"`` fits to it only when it is given.
        r_min: smallest rank any module gets.
        r_max: largest rank any module gets.
        threshold: energy share of the energy rank.
        batches: ``"warmup"``: keyword batches for ``model(**batch)`` to measure gradients on.
        loss_fn: ``"warmup"``: maps the model output to a scalar loss; default ``output.loss``.
        alpha: ``"warmup"``: weight of the gradient term.
        beta: ``"warmup"``: weight of the weight-change term.
    """
    if method not in ("energy", "warmup"):
        raise ValueError(f"method must be 'energy' or 'warmup', got {method!r}")
    targets = adapter_targets(model)
    if not targets:
        raise ValueError("reallocate: the model has no lora_fast adapters (run lora_fast.inject first)")
    current = {name: layer.r for name, layer in _lora_layers(model).items()}
    fit_warmup = budget is not None
    budget = lora_param_count(targets, current) if budget is None else int(budget)
    probe_result = probe(model) if probe is not None else None
    start = time.perf_counter()
    if method == "energy":
        from lora_fast.energy_rank import analyze

        scores = {rec.name: float(rec.energy_rank) for rec in analyze(model, threshold=threshold)}
        pattern = fit_budget(targets, scores, budget, r_min, r_max)
    else:
        if batches is None:
            raise ValueError("reallocate(method='warmup') needs gradient batches")
        scores = importance_scores(gradient_norms(model, batches, loss_fn), weight_changes(model), alpha, beta)
        if fit_warmup:
            pattern = fit_budget(targets, scores, budget, r_min, r_max)
        else:
            pattern = scores_to_ranks(scores, r_min, r_max)
    resize_adapters(model, pattern)
    return Reallocation(method, pattern, scores, budget, probe_result, time.perf_counter() - start)
