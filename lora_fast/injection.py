"""Put ``LoraLinear`` layers into any model (PEFT's matching rules, from ``lora_fast.peft_rules``), merge/unmerge."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

from torch import nn

from lora_fast.layers import LoraLinear
from lora_fast.layers import is_conv1d
from lora_fast.peft_rules import ConfigError
from lora_fast.peft_rules import check_dropout
from lora_fast.peft_rules import check_names
from lora_fast.peft_rules import check_number
from lora_fast.peft_rules import check_pattern
from lora_fast.peft_rules import check_rank
from lora_fast.peft_rules import is_saved_module
from lora_fast.peft_rules import match_pattern
from lora_fast.peft_rules import matches_saved_entry
from lora_fast.peft_rules import matches_target
from lora_fast.peft_rules import unmatched_keys

__all__ = ["inject", "lora_modules", "match_pattern", "matches_target", "merge", "unmerge"]


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    """All ``LoraLinear`` layers of ``model`` by full name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLinear)}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _restore(model: nn.Module, originals: Mapping[str, nn.Module], grads: Mapping[nn.Parameter, bool]) -> None:
    """Undo an injection: put the original modules back and every parameter's ``requires_grad`` as it was."""
    for name, module in originals.items():
        _set_submodule(model, name, module)
    for param, flag in grads.items():
        param.requires_grad_(flag)


def _check_arguments(target_modules: Any, r: Any, alpha: Any, dropout: Any, use_rslora: Any) -> None:
    check_names(target_modules, "target_modules", "inject", allow_regex=True)
    if target_modules is None or (not isinstance(target_modules, str) and not list(target_modules)):
        raise ConfigError("inject: target_modules is empty")
    check_rank(r, "r", "inject")
    check_number(alpha, "alpha", "inject")
    check_dropout(dropout, "dropout", "inject")
    if not isinstance(use_rslora, bool):
        raise ConfigError(f"inject: use_rslora must be True or False, got {use_rslora!r}")


def _check_patterns(
    rank_pattern: Any, alpha_pattern: Any, targets: Sequence[str], unmatched: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    ranks = check_pattern(rank_pattern, "rank_pattern", "inject")
    alphas = check_pattern(alpha_pattern, "alpha_pattern", "inject")
    for key, value in ranks.items():
        check_rank(value, f"rank_pattern[{key!r}]", "inject")
    for key, value in alphas.items():
        check_number(value, f"alpha_pattern[{key!r}]", "inject")
    for field_name, pattern in (("rank_pattern", ranks), ("alpha_pattern", alphas)):
        missing = unmatched_keys(pattern, targets)
        if missing:
            # PEFT ignores such keys silently; they are almost always a typo ("valu") that leaves the default rank
            message = (
                f"inject: {field_name} keys {missing} match none of the {len(targets)} target modules "
                f"(a key matches a name when the regex (.*\\.)?(key)$ does, e.g. {targets[0]!r})"
            )
            if unmatched == "raise":
                raise ConfigError(message)
            warnings.warn(message, stacklevel=4)
    return ranks, alphas


def _inject(
    model: nn.Module,
    target_modules: str | Sequence[str],
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    use_rslora: bool = False,
    modules_to_save: str | Sequence[str] | None = None,
    unmatched_patterns: str = "raise",
) -> dict[str, nn.Module]:
    """``inject``'s work; returns the replaced modules by name so that a caller can undo it with ``_restore``."""
    _check_arguments(target_modules, r, alpha, dropout, use_rslora)
    target_modules = check_names(target_modules, "target_modules", "inject", allow_regex=True)
    modules_to_save = check_names(modules_to_save, "modules_to_save", "inject", allow_regex=False) or []
    saved_modules = []
    for entry in modules_to_save:
        found = [m for name, m in model.named_modules() if matches_saved_entry(name, entry)]
        if not found:
            raise ValueError(f"inject: modules_to_save entry {entry!r} matched no module of {type(model).__name__}")
        saved_modules += found
    existing = lora_modules(model)
    inside_lora = tuple(name + "." for name in existing)

    targets: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not name or name.startswith(inside_lora) or is_saved_module(name, modules_to_save):
            continue
        if not matches_target(name, target_modules):
            continue
        if isinstance(module, LoraLinear):
            raise ValueError(f"inject: module {name!r} already is a LoraLinear; inject once per module")
        if not (isinstance(module, nn.Linear) or is_conv1d(module)):
            raise ValueError(
                f"inject: target {name!r} is a {type(module).__name__}; LoRA targets must be nn.Linear or Conv1D "
                "layers (name the linear layers inside it, e.g. 'query', 'value')"
            )
        targets[name] = module
    if not targets:
        raise ValueError(f"inject: target_modules {target_modules!r} matched no module of {type(model).__name__}")
    ranks, alphas = _check_patterns(rank_pattern, alpha_pattern, list(targets), unmatched_patterns)

    grads = {p: p.requires_grad for p in model.parameters()}
    try:
        new_layers = {
            name: LoraLinear(
                module,
                match_pattern(ranks, name, r),
                match_pattern(alphas, name, alpha),
                dropout=dropout,
                use_rslora=use_rslora,
            )
            for name, module in targets.items()
        }
        if not existing:
            # the first injection freezes the model; a later one keeps what earlier calls made trainable
            model.requires_grad_(False)
        for name, layer in new_layers.items():
            _set_submodule(model, name, layer)
        for layer in new_layers.values():
            layer.lora_A.requires_grad_(True)
            layer.lora_B.requires_grad_(True)
        for module in saved_modules:
            module.requires_grad_(True)
    except BaseException:
        _restore(model, targets, grads)
        raise
    return targets


def inject(
    model: nn.Module,
    target_modules: str | Sequence[str],
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    use_rslora: bool = False,
    modules_to_save: str | Sequence[str] | None = None,
) -> nn.Module:
    """Replace the target linear layers of ``model`` by ``LoraLinear`` in place, freeze everything else, return it.

    Every argument is checked before the model is touched; on any error the model is left as it was. A second call
    on the same model adds adapters to other modules and keeps what the first made trainable.

    Args:
        model: any module, e.g. a Hugging Face model.
        target_modules: list of module names or ``.``-suffixes (``["query", "value"]``), or a regex that must match
            a full name (PEFT semantics).
        r: default rank.
        alpha: default alpha (finite, non-zero: alpha 0 would keep ΔW and the gradients of A and B at zero).
        dropout: dropout probability on the LoRA branch.
        rank_pattern: per-module ranks, {name-suffix-or-regex: r}, first matching key wins (PEFT semantics). A key
            that matches no target raises (PEFT ignores it silently).
        alpha_pattern: per-module alphas, same matching.
        use_rslora: scale by alpha / sqrt(r) instead of alpha / r.
        modules_to_save: names/suffixes of modules left fully trainable (e.g. ``["classifier"]``; one name may be
            given as a string); never adapted.

    Raises:
        ValueError: a bad argument (named), targets that match nothing or are not linear layers.
    """
    _inject(model, target_modules, r, alpha, dropout, rank_pattern, alpha_pattern, use_rslora, modules_to_save)
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight (W += s B A); returns the model.

    Args:
        model: a model with ``LoraLinear`` layers.
    """
    for layer in lora_modules(model).values():
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo ``merge`` (W -= s B A) on every ``LoraLinear``; returns the model.

    Args:
        model: a model with ``LoraLinear`` layers.
    """
    for layer in lora_modules(model).values():
        layer.unmerge()
    return model
