"""Fortune cookies labelled by category file (43 classes with ``fortunes`` + ``fortunes-min``), from Debian."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from experiments.data import MissingDataError
from lora_fast.data import ClassificationData

DEFAULT_ROOT = Path("/usr/share/games/fortunes")


def load_fortunes(root: str | Path | None = None, min_count: int = 1) -> ClassificationData:
    """Every fortune, labelled by the file it comes from; files are split on ``"\\n%\\n"``.

    Args:
        root: the fortunes folder; defaults to ``$FORTUNES_DIR`` or ``/usr/share/games/fortunes``.
        min_count: drop categories with fewer fortunes (``pratchett`` has 2).
    """
    folder = Path(root or os.environ.get("FORTUNES_DIR") or DEFAULT_ROOT)
    # strfile(1) writes a binary index "<name>.dat" beside each text file; the .u8 files are links to the text.
    files = (
        sorted(p for p in folder.iterdir() if p.is_file() and p.suffix not in (".dat", ".u8"))
        if folder.is_dir()
        else []
    )
    if not files:
        raise MissingDataError("fortunes", folder, "apt-get install fortunes fortunes-min")
    names: list[str] = []
    texts: list[str] = []
    labels: list[int] = []
    for path in files:
        items = [t.strip() for t in path.read_text(encoding="utf-8", errors="replace").split("\n%\n")]
        items = [t.strip("%").strip() for t in items if t.strip("%").strip()]
        if len(items) < min_count:
            continue
        labels += [len(names)] * len(items)
        texts += items
        names.append(path.name)
    return ClassificationData("fortunes", torch.tensor(labels, dtype=torch.long), tuple(names), texts=tuple(texts))
