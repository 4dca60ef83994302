"""``RunContext``: what the runs executed by one process share (loaded base models, tokenizers, dataset splits).

A worker process builds one context and keeps it for all its runs, so the base model is read from disk once per
worker and each run starts from a deep copy of it: for the 6-layer MiniLM, measured on the 2-core CPU under load, a
deep copy takes 0.2-0.4 s, the first load in a fresh process 20 s (imports, cold files) and a warm reload 0.5 s.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from experiments.runner.config import ModelSettings
from experiments.runner.config import SweepConfig


def _key(options: Mapping[str, Any]) -> str:
    return json.dumps(dict(options), sort_keys=True)


@dataclass(frozen=True)
class Runtime:
    """How this invocation runs the sweep; none of it is stored in ``config.json`` (results never depend on it,
    except ``device``, which every run row records).

    Args:
        device: ``auto``, ``cpu`` or ``cuda``.
        progress: per-step progress bars (off in worker pools, where they would interleave).
        threads: torch threads per worker process.
        workers: worker processes.
    """

    device: str
    progress: bool
    threads: int
    workers: int


class RunContext:
    """Per-process caches and settings handed to every study's ``execute``.

    Args:
        config: the resolved configuration.
        out: the results folder.
        runtime: device, progress bars, threads.
    """

    def __init__(self, config: SweepConfig, out: str | Path, runtime: Runtime) -> None:
        self.config = config
        self.out = Path(out)
        self.device = runtime.device
        self.progress = runtime.progress
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

    def dataset(self, name: str, options: Mapping[str, Any] | None = None) -> Any:
        """A corpus of ``experiments.data`` (loaded once per name and options).

        Args:
            name: a key of ``experiments.data.DATASETS``.
            options: keyword arguments of its loader (e.g. ``{"size": 112}`` for clip art).
        """
        from experiments.data import load_dataset

        options = dict(options or {})
        return self.cached(("data", name, _key(options)), lambda: load_dataset(name, **options))

    def dataset_split(
        self, name: str, test_fraction: float, seed: int, options: Mapping[str, Any] | None = None
    ) -> tuple[Any, Any]:
        """``(train_pool, test_pool)``: a stratified split of a corpus, cached.

        Args:
            name: corpus name.
            test_fraction: held-out share per class.
            seed: split seed.
            options: keyword arguments of its loader.
        """
        from experiments.data.sampling import train_test_split

        key = ("split", name, _key(options or {}), test_fraction, seed)
        return self.cached(key, lambda: train_test_split(self.dataset(name, options), test_fraction, seed))

    def classifier(self, model: ModelSettings, num_labels: int, seed: int) -> tuple[nn.Module, Any]:
        """A fresh copy of a registered classifier with a new ``num_labels`` head drawn from ``seed``, and its
        tokenizer (the base model is loaded once per process).

        Args:
            model: the study's model section.
            num_labels: classes.
            seed: head initialisation seed.
        """
        from experiments.models import load_classifier
        from experiments.models import with_new_head

        base, tokenizer = self.cached(("classifier", model.name, model.num_layers),
                                      lambda: load_classifier(model.name, model.num_layers))  # fmt: skip
        return with_new_head(copy.deepcopy(base), num_labels, seed), tokenizer

    def causal_lm(self, model: ModelSettings) -> tuple[nn.Module, Any]:
        """A fresh copy of a registered causal LM and its tokenizer (loaded once per process).

        Args:
            model: the study's model section.
        """
        from experiments.models import load_causal_lm

        base, tokenizer = self.cached(("causal_lm", model.name, model.num_layers),
                                      lambda: load_causal_lm(model.name, model.num_layers))  # fmt: skip
        return copy.deepcopy(base), tokenizer
