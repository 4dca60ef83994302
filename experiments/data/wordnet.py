"""WordNet glosses labelled by lexicographer file (45 classes), from Debian's ``wordnet-base``.

Each synset line of ``data.{noun,verb,adj,adv}`` is ``offset lex_filenum ss_type ... | gloss``; the label is the
second field and the text is everything after ``" | "``. Lines starting with two spaces are the licence header.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from experiments.data import MissingDataError
from lora_fast.data import ClassificationData

DEFAULT_ROOT = Path("/usr/share/wordnet")
_POS_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")

# Lexicographer file names by number, from lexnames(5WN) of WordNet 3.0.
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant",
    "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
    "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition", "verb.communication",
    "verb.competition", "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)  # fmt: skip


def load_wordnet(root: str | Path | None = None) -> ClassificationData:
    """All 117,659 WordNet 3.0 glosses, labelled with their lexicographer file number (45 classes).

    Args:
        root: folder holding ``data.noun`` etc.; defaults to ``$WORDNET_DIR`` or ``/usr/share/wordnet``.
    """
    folder = Path(root or os.environ.get("WORDNET_DIR") or DEFAULT_ROOT)
    paths = [folder / name for name in _POS_FILES]
    if not all(p.is_file() for p in paths):
        raise MissingDataError("wordnet", folder, "apt-get install wordnet-base")
    texts: list[str] = []
    labels: list[int] = []
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("  ") or " | " not in line:
                    continue
                labels.append(int(line.split(" ", 2)[1]))
                texts.append(line.split(" | ", 1)[1].strip())
    return ClassificationData("wordnet", torch.tensor(labels, dtype=torch.long), LEXNAMES, texts=tuple(texts))
