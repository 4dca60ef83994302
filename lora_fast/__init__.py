"""lora_fast: fused LoRA kernels and cheap, batched spectral analysis of LoRA adapters.

Submodules are imported on first use so that ``import lora_fast`` stays cheap (no transformers/peft import).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "available_backends": "lora_fast.ops._backend",
    "LoraLinear": "lora_fast.layers",
    "inject": "lora_fast.injection",
    "merge": "lora_fast.injection",
    "unmerge": "lora_fast.injection",
    "from_peft": "lora_fast.peft_io",
    "save_adapter": "lora_fast.peft_io",
    "load_adapter": "lora_fast.peft_io",
}
_SUBMODULES = ("energy_rank", "ops", "layers", "injection", "peft_io", "train", "data", "allocation")

__all__ = sorted([*_EXPORTS, *_SUBMODULES, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"lora_fast.{name}")
    else:
        raise AttributeError(f"module 'lora_fast' has no attribute {name!r}")
    globals()[name] = value
    return value
