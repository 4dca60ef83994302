"""The module-naming rules allocation depends on, in one private place (PEFT's rules; they move to the library's
single home for PEFT naming when there is one).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def layer_index(name: str) -> int:
    """Index of the transformer block a module sits in (first ``.<int>.`` of its name), -1 outside any block."""
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else -1


def matched_target(name: str, target_modules: Sequence[str]) -> str | None:
    """The first entry of ``target_modules`` that selects ``name`` with PEFT's list semantics (name equal to the
    entry or ending in ``.entry``), or None.
    """
    return next((k for k in target_modules if name == k or name.endswith("." + k)), None)


def is_attention(name: str) -> bool:
    """True for attention projections: a name segment contains ``attn`` or ``attention`` (BERT, LLaMA, GPT-2)."""
    return any("attn" in part or "attention" in part for part in name.split("."))
