"""``ClassificationData``: the container ``lora_fast.train`` reads for classification (texts or an input tensor).

Corpora that fill it (WordNet, fortunes, Fashion-MNIST, ...) live with the experiments, in ``experiments/data/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import replace

import torch

__all__ = ["ClassificationData"]


@dataclass(frozen=True)
class ClassificationData:
    """Examples with integer labels: either ``texts`` (for a tokenizer) or an ``inputs`` tensor (N, ...).

    Args:
        name: corpus name, e.g. ``"wordnet"``.
        labels: int64 tensor (N,), values in ``[0, len(class_names))``.
        class_names: one name per label value.
        texts: the N raw texts, for text corpora.
        inputs: float tensor (N, ...), for image/feature corpora.
    """

    name: str
    labels: torch.Tensor
    class_names: tuple[str, ...]
    texts: tuple[str, ...] | None = None
    inputs: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.texts is None) == (self.inputs is None):
            raise ValueError("exactly one of texts / inputs must be given")
        n = len(self.texts) if self.texts is not None else self.inputs.shape[0]
        if self.labels.shape != (n,):
            raise ValueError(f"labels shape {tuple(self.labels.shape)} does not match {n} examples")

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_counts(self) -> torch.Tensor:
        """Number of examples per class, shape (num_classes,)."""
        return torch.bincount(self.labels, minlength=self.num_classes)

    def select(self, indices: Sequence[int] | torch.Tensor) -> ClassificationData:
        """The examples at ``indices`` (labels and class names unchanged)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        texts = tuple(self.texts[i] for i in idx.tolist()) if self.texts is not None else None
        inputs = self.inputs[idx] if self.inputs is not None else None
        return replace(self, labels=self.labels[idx], texts=texts, inputs=inputs)

    def with_labels(self, labels: torch.Tensor, class_names: Sequence[str] | None = None) -> ClassificationData:
        """The same examples with new labels (and optionally new class names)."""
        names = tuple(class_names) if class_names is not None else self.class_names
        return replace(self, labels=labels.to(torch.long), class_names=names)
