"""Support for ``experiments/run.py``: configuration, run specs, the results store, shared caches and reporting."""

from __future__ import annotations

from experiments.runner.config import DEFAULT_CONFIG
from experiments.runner.config import load_config
from experiments.runner.context import RunContext
from experiments.runner.spec import RunSpec
from experiments.runner.store import ResultStore

__all__ = ["DEFAULT_CONFIG", "ResultStore", "RunContext", "RunSpec", "load_config"]
