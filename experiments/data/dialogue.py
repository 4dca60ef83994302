"""Dialogue (prompt, reply) pairs from PyPI ``chitchat-dataset`` (7,168 two-person chats, MIT licence).

A chat is a list of turns; a turn is one or more consecutive messages by the same sender, joined with a space.
A pair is two consecutive turns. Train and eval pairs come from disjoint conversations, one pair per conversation,
so no chat leaks from training into evaluation.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from experiments.data import MissingDataError

__all__ = ["DialoguePair", "chatml", "load_chitchat_pairs"]


@dataclass(frozen=True)
class DialoguePair:
    """One exchange: ``prompt`` by one speaker, ``reply`` by the other."""

    prompt: str
    reply: str


def _chitchat_path(path: str | Path | None) -> Path:
    if path is not None:
        return Path(path)
    if os.environ.get("CHITCHAT_DATASET"):
        return Path(os.environ["CHITCHAT_DATASET"])
    spec = importlib.util.find_spec("chitchat_dataset")  # only locate the file; the package itself is not needed
    if spec is None or spec.origin is None:
        raise MissingDataError("chitchat", "chitchat_dataset/dataset.json", "pip install chitchat-dataset")
    return Path(spec.origin).parent / "dataset.json"


def load_chitchat_pairs(
    n_train: int,
    n_eval: int,
    seed: int = 0,
    max_chars: int = 200,
    path: str | Path | None = None,
) -> tuple[list[DialoguePair], list[DialoguePair]]:
    """``n_train`` and ``n_eval`` pairs from disjoint, randomly chosen conversations (one pair each).

    Args:
        n_train: training pairs.
        n_eval: evaluation pairs.
        seed: picks the conversations and which of their pairs; fixed seed, fixed pairs.
        max_chars: skip pairs whose prompt or reply is longer (keeps sequences short for CPU runs).
        path: the ``dataset.json``; defaults to ``$CHITCHAT_DATASET`` or the installed package's file.
    """
    file = _chitchat_path(path)
    if not file.is_file():
        raise MissingDataError("chitchat", file, "pip install chitchat-dataset")
    chats = json.loads(file.read_text(encoding="utf-8"))
    rng = random.Random(seed)
    keys = sorted(chats)
    rng.shuffle(keys)
    pairs: list[DialoguePair] = []
    for key in keys:
        turns = [" ".join(m["text"].strip() for m in turn).strip() for turn in chats[key]["messages"]]
        candidates = [
            DialoguePair(a, b)
            for a, b in itertools.pairwise(turns)
            if a and b and len(a) <= max_chars and len(b) <= max_chars
        ]
        if candidates:
            pairs.append(rng.choice(candidates))
        if len(pairs) == n_train + n_eval:
            return pairs[:n_train], pairs[n_train:]
    raise ValueError(f"only {len(pairs)} conversations have a pair of <= {max_chars} characters")


def chatml(pair: DialoguePair) -> str:
    """The pair in ChatML, the chat format SmolLM2-Instruct was tuned on (its template minus the system turn)."""
    return f"<|im_start|>user\n{pair.prompt}<|im_end|>\n<|im_start|>assistant\n{pair.reply}<|im_end|>\n"
