"""scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes)."""

from __future__ import annotations

import torch

from experiments.data import MissingDataError
from lora_fast.data import ClassificationData


def load_digits() -> ClassificationData:
    """The digits as float32 images in [0, 1], shape (1797, 8, 8)."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as exc:
        raise MissingDataError("digits", "sklearn.datasets", "pip install scikit-learn") from exc
    bunch = sklearn_digits()
    # Pixel values are counts 0..16 of a 4x4 block of the original 32x32 bitmap.
    x = torch.as_tensor(bunch.images, dtype=torch.float32) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    return ClassificationData("digits", y, tuple(str(d) for d in range(10)), inputs=x)
