"""Configuration: the embedded CPU default, and YAML/JSON files merged over it.

A configuration is a dict: global keys (``seed``, ``device``, ``progress``, ``num_threads``, ``model``, ``studies``)
plus one section per study, named after it. A file only needs the keys it changes; ``load_config`` merges it over
``DEFAULT_CONFIG`` (dicts recursively, everything else replaced).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

# Sized for a 2-core CPU: measured on an idle one, a whole 64-step run (setup, training, eval, analysis) took
# 31-48 s with LoRA and 42-68 s for full fine-tuning, which put the default at ~20 min. So studies 1-3 use 48 steps
# and 4 class counts (4 full + 10 LoRA runs). Runs are short (2 epochs over 384 examples, one class subset per n):
# they show the pipeline and the direction of the trends, not the study's statistics.
DEFAULT_CONFIG: dict[str, Any] = {
    "name": "default-cpu-small",
    "scale": "SMALL-SCALE CPU DEMO (6-layer MiniLM, 48 steps per run for studies 1-3, 36 for the LoRA-vs-full and "
             "allocation studies, one class subset per n); not the study's scale",
    "seed": 0,
    "device": "auto",
    "progress": True,
    # torch's default is one thread per core; None leaves it.
    "num_threads": None,
    "studies": ["rank_vs_classes", "layerwise", "label_noise", "lora_vs_full", "rank_allocation"],
    "model": {"name": "minilm", "num_layers": 6, "max_length": 32},
    "rank_vs_classes": {
        "dataset": "wordnet",
        "test_fraction": 0.2,
        # 34 of the 45 lexicographer files have >= 500 glosses
        "min_per_class": 500,
        "class_counts": [2, 4, 8, 32],
        "subsets_per_count": 1,
        "train_size": 384,
        "eval_size": 200,
        "energy_threshold": 0.95,
        "snapshot_every": 16,
        "lora": {"targets": ["query", "key", "value"], "r": 8, "alpha": 16, "lr": 2e-3, "max_steps": 48,
                 "batch_size": 16},
        "full": {"lr": 1e-4, "max_steps": 48, "batch_size": 16},
    },
    "layerwise": {"source": "rank_vs_classes"},
    "label_noise": {
        "dataset": "wordnet",
        "test_fraction": 0.2,
        "min_per_class": 500,
        "num_classes": 8,
        "noise": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],
        "repeats": 1,
        "train_size": 384,
        "eval_size": 200,
        "energy_threshold": 0.95,
        "snapshot_every": 0,
        "lora": {"targets": ["query", "key", "value"], "r": 8, "alpha": 16, "lr": 2e-3, "max_steps": 48,
                 "batch_size": 16},
    },
}  # fmt: skip


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """A new dict: ``override`` merged over ``base`` (nested dicts merged, other values replaced).

    Args:
        base: defaults.
        override: changes.
    """
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a ``.json``, ``.yaml`` or ``.yml`` file into a dict.

    Args:
        path: the file.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    elif path.suffix == ".json":
        data = json.loads(text)
    else:
        raise ValueError(f"{path}: config files must end in .json, .yaml or .yml")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be a mapping")
    return data


def load_config(path: str | Path | None = None) -> dict[str, Any]:
    """``DEFAULT_CONFIG``, with the file at ``path`` merged over it when given.

    Args:
        path: optional YAML/JSON file.
    """
    return merge(DEFAULT_CONFIG, read_config_file(path)) if path is not None else copy.deepcopy(DEFAULT_CONFIG)
