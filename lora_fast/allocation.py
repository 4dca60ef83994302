"""Per-layer LoRA rank allocation strategies.

Every strategy returns a ``rank_pattern``: a dict from full module name to rank, which ``lora_fast.inject`` and
PEFT's ``LoraConfig(rank_pattern=...)`` both accept (PEFT matches a key ``k`` against a module name ``m`` with
``re.match(rf"(.*\\.)?({k})$", m)``; a full module name matches only itself). Strategies:

* ``uniform`` — the same rank everywhere.
* ``linear_decay`` — rank interpolated linearly over depth (16 → 4 by default).
* ``attention_heavy`` — a high rank on attention projections, a low rank elsewhere.
* ``empirical`` — early/middle/late thirds of the depth get 60% / 120% / 100% of a base rank.
* ``from_layer_list`` / ``load_layer_list`` — a per-layer list of ranks, e.g. from a JSON file.
* ``warmup_importance`` — after a short warm-up, score = α·normalised gradient norm + β·normalised weight change,
  mapped linearly to [r_min, r_max] (``gradient_norms`` and ``weight_changes`` measure the two terms).
* ``energy_guided`` — ranks proportional to each module's energy rank after a probe run, fitted to a parameter
  budget (by default that of uniform r=8) with ``fit_budget``.

``resize_adapters`` continues training from a probe or warm-up: each adapter is re-factored to its new rank from
the truncated SVD of its current update, so nothing the probe learned is thrown away beyond the truncation.
PEFT's AdaLoRA is wired as an outside baseline by ``adalora_config``, ``adalora_step_hook`` and ``adalora_ranks``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "TargetModule",
    "adalora_config",
    "adalora_ranks",
    "adalora_step_hook",
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
    "resize_adapters",
    "scores_to_ranks",
    "uniform",
    "warmup_importance",
    "weight_changes",
]

RankPattern = dict[str, int]

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


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


def is_attention(name: str) -> bool:
    """True for attention projections: a name segment contains ``attn`` or ``attention`` (BERT, LLaMA, GPT-2)."""
    return any("attn" in part or "attention" in part for part in name.split("."))


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    base = getattr(module, "base_layer", None)  # an already-wrapped layer (lora_fast or PEFT)
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # GPT-2: weight stored (in, out)
        in_features, out_features = module.weight.shape
        return int(in_features), int(out_features)
    return None


def find_targets(model: nn.Module, target_modules: Sequence[str]) -> list[TargetModule]:
    """The linear layers that ``target_modules`` selects, with PEFT's list semantics (name equal to a key or
    ending in ``.key``), in ``named_modules`` order. Layers already wrapped by an adapter count once.

    Args:
        model: the model (before or after injection).
        target_modules: module-name suffixes such as ``["query", "value"]`` or ``["q_proj", "v_proj"]``.
    """
    targets: list[TargetModule] = []
    for name, module in model.named_modules():
        key = next((k for k in target_modules if name == k or name.endswith("." + k)), None)
        shape = _linear_shape(module) if key is not None else None
        if shape is None:
            continue
        match = _LAYER_INDEX.search(name)
        targets.append(TargetModule(name, int(match.group(1)) if match else -1, key, shape[0], shape[1]))
    if not targets:
        raise ValueError(f"no linear layer matches target_modules={list(target_modules)}")
    return targets


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


@torch.no_grad()
def resize_adapters(model: nn.Module, pattern: Mapping[str, int]) -> None:
    """Give every ``LoraLinear`` named in ``pattern`` its new rank, keeping its current update ΔW = s·B·A.

    With ΔW = U S Vᵀ, the new factors are B = U_r √S_r / √s', A = √S_r V_rᵀ / √s' (s' the new scaling), so
    s'·B·A is ΔW truncated to rank r (exact when r ≥ rank ΔW). Extra rows of A beyond rank ΔW are drawn fresh
    (Kaiming-uniform, as at init) with zero columns of B, so they start contributing nothing, as a new adapter does.

    Args:
        model: a model with ``lora_fast.LoraLinear`` layers.
        pattern: new rank per module name.
    """
    for name, layer in _lora_layers(model).items():
        r = pattern.get(name)
        if r is None or r == layer.r:
            continue
        delta = layer.delta_weight()
        scaling = layer.lora_alpha / (math.sqrt(r) if layer.use_rslora else r)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        keep = min(r, layer.r, s.numel())
        root = (s[:keep] / scaling).sqrt()
        dtype, device = layer.lora_A.dtype, layer.lora_A.device
        new_a = torch.empty(r, layer.in_features, dtype=dtype, device=device)
        nn.init.kaiming_uniform_(new_a, a=math.sqrt(5))
        new_b = torch.zeros(layer.out_features, r, dtype=dtype, device=device)
        new_a[:keep] = (root[:, None] * vh[:keep]).to(dtype)
        new_b[:, :keep] = (u[:, :keep] * root[None, :]).to(dtype)
        layer.lora_A = nn.Parameter(new_a, requires_grad=layer.lora_A.requires_grad)
        layer.lora_B = nn.Parameter(new_b, requires_grad=layer.lora_B.requires_grad)
        layer.r, layer.scaling = r, scaling


def adalora_config(
    target_modules: Sequence[str],
    total_step: int,
    target_r: int = 8,
    init_r: int = 12,
    lora_alpha: float = 16.0,
    modules_to_save: Sequence[str] | None = None,
    task_type: str | None = None,
) -> Any:
    """PEFT ``AdaLoraConfig`` for a run of ``total_step`` optimizer steps: ranks start at ``init_r`` and are pruned
    to an average of ``target_r`` between 10% and 70% of training (AdaLoRA's cubic budget schedule), then frozen.

    Args:
        target_modules: module-name suffixes to adapt.
        total_step: optimizer steps of the whole run.
        target_r: average final rank (the budget uniform r=``target_r`` has, counted in ranks).
        init_r: starting rank of every module.
        lora_alpha: alpha.
        modules_to_save: extra fully trained modules (e.g. a classifier head).
        task_type: PEFT task type, e.g. ``"SEQ_CLS"`` or ``"CAUSAL_LM"``.
    """
    from peft import AdaLoraConfig

    tinit = max(1, total_step // 10)
    tfinal = max(1, (3 * total_step) // 10)
    return AdaLoraConfig(
        target_modules=list(target_modules),
        init_r=init_r,
        target_r=target_r,
        lora_alpha=lora_alpha,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=max(1, total_step // 20),
        total_step=total_step,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        task_type=task_type,
    )


def adalora_step_hook(peft_model: nn.Module) -> Callable[[], None]:
    """Call AdaLoRA's ``update_and_allocate`` after every optimizer step of any optimizer (a global post-step
    hook, so it works with a training loop that knows nothing about AdaLoRA). Returns the function that removes it.

    AdaLoRA reads ``p.grad`` in the update, so the loop must zero gradients after ``optimizer.step()``, not
    between ``backward()`` and ``step()``.

    Args:
        peft_model: the ``PeftModel`` from ``get_peft_model(model, adalora_config(...))``.
    """
    from torch.optim.optimizer import register_optimizer_step_post_hook

    step = [0]

    def after_step(_optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        step[0] += 1
        peft_model.base_model.update_and_allocate(step[0])

    return register_optimizer_step_post_hook(after_step).remove


def adalora_ranks(peft_model: nn.Module, prefix: str = "base_model.model.") -> RankPattern:
    """Real per-module ranks of a trained AdaLoRA model: singular values left unmasked (non-zero ``lora_E``).

    Args:
        peft_model: the trained ``PeftModel``.
        prefix: wrapper prefix to drop so names match ``find_targets`` on the bare model.
    """
    ranks = {}
    for name, module in peft_model.named_modules():
        lora_e = getattr(module, "lora_E", None)
        if isinstance(lora_e, nn.ParameterDict) and "default" in lora_e:
            key = name[len(prefix) :] if name.startswith(prefix) else name
            ranks[key] = int((lora_e["default"] != 0).sum())
    return ranks
