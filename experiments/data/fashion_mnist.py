"""Fashion-MNIST (10 classes, 28x28 grey images) from Debian's ``dataset-fashion-mnist`` (IDX files, gzipped)."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import torch

from experiments.data import MissingDataError
from lora_fast.data import ClassificationData

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_PREFIX = {"train": "train", "test": "t10k"}


def _read_idx(path: Path) -> torch.Tensor:
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    # IDX header: two zero bytes, a type code (0x08 = uint8) and the number of dimensions, then big-endian sizes.
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return torch.frombuffer(bytearray(raw[4 + 4 * ndim :]), dtype=torch.uint8).reshape(shape)


def load_fashion_mnist(split: str = "train", root: str | Path | None = None) -> ClassificationData:
    """Fashion-MNIST images as float32 in [0, 1], shape (N, 28, 28): 60,000 train or 10,000 test.

    Args:
        split: ``"train"`` or ``"test"``.
        root: folder with the ``*-idx*-ubyte.gz`` files; defaults to ``$FASHION_MNIST_DIR`` or Debian's path.
    """
    if split not in _PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = Path(root or os.environ.get("FASHION_MNIST_DIR") or DEFAULT_ROOT)
    images = folder / f"{_PREFIX[split]}-images-idx3-ubyte.gz"
    labels = folder / f"{_PREFIX[split]}-labels-idx1-ubyte.gz"
    if not (images.is_file() and labels.is_file()):
        raise MissingDataError("fashion_mnist", folder, "apt-get install dataset-fashion-mnist")
    x = _read_idx(images).to(torch.float32) / 255.0
    y = _read_idx(labels).to(torch.long)
    return ClassificationData("fashion_mnist", y, CLASS_NAMES, inputs=x)
