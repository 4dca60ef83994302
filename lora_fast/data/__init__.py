"""Offline datasets for the experiments, each read from a Debian or PyPI package installed on the machine.

=================  =======  ===============================================  ===========================
name               classes  examples                                         provided by
=================  =======  ===============================================  ===========================
``wordnet``        45       117,659 glosses (text)                           Debian ``wordnet-base``
``fortunes``       43       15,217 fortunes (text)                           Debian ``fortunes``,
                                                                             ``fortunes-min``
``fashion_mnist``  10       60,000 + 10,000 images 28x28                     Debian ``dataset-fashion-mnist``
``digits``         10       1,797 images 8x8                                 PyPI ``scikit-learn``
=================  =======  ===============================================  ===========================

A missing corpus raises ``MissingDataError`` naming the package to install. ``sampling`` holds the study tools:
stratified splits, n-of-t class subsets with the number of examples held fixed, and label noise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lora_fast.data._base import ClassificationData
from lora_fast.data._base import MissingDataError
from lora_fast.data.digits import load_digits
from lora_fast.data.fashion_mnist import load_fashion_mnist
from lora_fast.data.fortunes import load_fortunes
from lora_fast.data.sampling import add_label_noise
from lora_fast.data.sampling import balanced_subset
from lora_fast.data.sampling import eligible_classes
from lora_fast.data.sampling import noisy_fraction
from lora_fast.data.sampling import sample_class_subsets
from lora_fast.data.sampling import train_test_split
from lora_fast.data.wordnet import load_wordnet

LOADERS: dict[str, Callable[..., ClassificationData]] = {
    "digits": load_digits,
    "fashion_mnist": load_fashion_mnist,
    "fortunes": load_fortunes,
    "wordnet": load_wordnet,
}


def load_dataset(name: str, **kwargs: Any) -> ClassificationData:
    """Load a corpus by name (see the table above).

    Args:
        name: one of ``LOADERS``.
        kwargs: passed to the loader, e.g. ``root=`` to read from another folder.
    """
    if name not in LOADERS:
        raise KeyError(f"unknown dataset {name!r}; available: {sorted(LOADERS)}")
    return LOADERS[name](**kwargs)


__all__ = [
    "LOADERS",
    "ClassificationData",
    "MissingDataError",
    "add_label_noise",
    "balanced_subset",
    "eligible_classes",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_fortunes",
    "load_wordnet",
    "noisy_fraction",
    "sample_class_subsets",
    "train_test_split",
]
