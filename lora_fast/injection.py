"""Put ``LoraLinear`` layers into any model (PEFT's matching rules), and merge/unmerge them."""

from __future__ import annotations

import re
from collections.abc import Mapping
from collections.abc import Sequence

from torch import nn

from lora_fast.layers import LoraLinear
from lora_fast.layers import is_conv1d

__all__ = ["inject", "lora_modules", "match_pattern", "matches_target", "merge", "unmerge"]


def matches_target(name: str, target_modules: str | Sequence[str]) -> bool:
    """PEFT's rule: a regex string must match the full name; a list entry must equal the name or be a ``.``-suffix.

    Args:
        name: the module's full name in ``model.named_modules()``.
        target_modules: regex string, or list of names/suffixes.
    """
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == target or name.endswith("." + target) for target in target_modules)


def match_pattern(pattern: Mapping[str, float] | None, name: str, default: float) -> float:
    """The value of the first key of ``pattern`` (in order) that matches ``name`` as PEFT's ``rank_pattern`` does.

    A key matches when ``(.*\\.)?(key)$`` matches the full name, i.e. the key is a regex for a ``.``-suffix.

    Args:
        pattern: {name-or-regex: value}, or None.
        name: the module's full name.
        default: the value when no key matches.
    """
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    """All ``LoraLinear`` layers of ``model`` by full name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLinear)}


def _is_saved_module(name: str, modules_to_save: Sequence[str]) -> bool:
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in modules_to_save)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def inject(
    model: nn.Module,
    target_modules: str | Sequence[str],
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    use_rslora: bool = False,
    modules_to_save: Sequence[str] | None = None,
) -> nn.Module:
    """Replace the target linear layers of ``model`` by ``LoraLinear`` in place, freeze everything else, return it.

    Args:
        model: any module, e.g. a Hugging Face model.
        target_modules: list of module names or ``.``-suffixes (``["query", "value"]``), or a regex that must match
            a full name (PEFT semantics).
        r: default rank.
        alpha: default alpha.
        dropout: dropout probability on the LoRA branch.
        rank_pattern: per-module ranks, {name-suffix-or-regex: r}, first matching key wins (PEFT semantics).
        alpha_pattern: per-module alphas, same matching.
        use_rslora: scale by alpha / sqrt(r) instead of alpha / r.
        modules_to_save: names/suffixes of modules left fully trainable (e.g. ``["classifier"]``); never adapted.
    """
    if isinstance(target_modules, str):
        if not target_modules:
            raise ValueError("target_modules is an empty string")
    elif not target_modules:
        raise ValueError("target_modules is empty")
    modules_to_save = list(modules_to_save or [])
    saved_modules = []
    for entry in modules_to_save:
        found = [m for name, m in model.named_modules() if name == entry or name.endswith("." + entry)]
        if not found:
            raise ValueError(f"modules_to_save entry {entry!r} matched no module of {type(model).__name__}")
        saved_modules += found
    inside_lora = tuple(name + "." for name in lora_modules(model))

    targets: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not name or name.startswith(inside_lora) or _is_saved_module(name, modules_to_save):
            continue
        if not matches_target(name, target_modules):
            continue
        if isinstance(module, LoraLinear):
            raise ValueError(f"module {name!r} already is a LoraLinear; inject once per model")
        if not (isinstance(module, nn.Linear) or is_conv1d(module)):
            raise ValueError(
                f"target {name!r} is a {type(module).__name__}; LoRA targets must be nn.Linear or Conv1D layers "
                "(name the linear layers inside it, e.g. 'query', 'value')"
            )
        targets[name] = module
    if not targets:
        raise ValueError(f"target_modules {target_modules!r} matched no module of {type(model).__name__}")

    new_layers = {}
    for name, module in targets.items():
        rank = match_pattern(rank_pattern, name, r)
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"rank for {name!r} must be a positive int, got {rank!r}")
        layer_alpha = match_pattern(alpha_pattern, name, alpha)
        new_layers[name] = LoraLinear(module, rank, layer_alpha, dropout=dropout, use_rslora=use_rslora)

    model.requires_grad_(False)
    for name, layer in new_layers.items():
        _set_submodule(model, name, layer)
    for layer in lora_modules(model).values():
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    for module in saved_modules:
        module.requires_grad_(True)
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
