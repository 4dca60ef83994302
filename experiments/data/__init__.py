"""Offline datasets for the experiments, each read from a Debian or PyPI package installed on the machine.

=================  =======  ===============================================  ===========================
name               classes  examples                                         provided by
=================  =======  ===============================================  ===========================
``wordnet``        45       117,659 glosses (text)                           Debian ``wordnet-base``
``fortunes``       43       15,217 fortunes (text)                           Debian ``fortunes``,
                                                                             ``fortunes-min``
``fashion_mnist``  10       60,000 + 10,000 images 28x28                     Debian ``dataset-fashion-mnist``
``digits``         10       1,797 images 8x8                                 PyPI ``scikit-learn``
``clipart``        67       6,424 clip-art images (RGB, ``size`` px; 22         Debian ``openclipart-png``
                            classes with >= 40 images)
``fashion_mnist_`` 10       Fashion-MNIST as RGB ``size`` px for the ViT        Debian ``dataset-fashion-mnist``
``rgb``                     (``per_class`` images per class)
=================  =======  ===============================================  ===========================

Every loader returns a ``lora_fast.data.ClassificationData``; a missing corpus raises ``MissingDataError`` naming
the package to install. ``DATASETS`` is the registry ``load_dataset`` reads: a new corpus joins it with one line
``"name": "experiments.data.<module>:<function>"`` (imported on first use, so a study never pays for corpora it does
not read). ``sampling`` holds the study tools (stratified splits, n-of-t class subsets with the number of examples
held fixed, label noise); ``dialogue`` the chit-chat pairs of the causal-LM study.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from lora_fast.data import ClassificationData

__all__ = ["DATASETS", "MissingDataError", "dataset_options", "load_dataset"]

# name -> "module:function"; the function's keyword arguments pass through load_dataset
DATASETS: dict[str, str] = {
    "clipart": "experiments.data.clipart:load_clipart",
    "digits": "experiments.data.digits:load_digits",
    "fashion_mnist": "experiments.data.fashion_mnist:load_fashion_mnist",
    "fashion_mnist_rgb": "experiments.data.clipart:load_fashion_mnist_rgb",
    "fortunes": "experiments.data.fortunes:load_fortunes",
    "wordnet": "experiments.data.wordnet:load_wordnet",
}


class MissingDataError(FileNotFoundError):
    """A corpus's files are missing; the message names the package that provides them."""

    def __init__(self, dataset: str, path: str | Path, install: str) -> None:
        self.dataset = dataset
        self.path = str(path)
        self.install = install
        super().__init__(f"{dataset}: no data found at {self.path}. Install it with: {install}")


def _loader(name: str) -> Any:
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; available: {', '.join(sorted(DATASETS))}")
    module, function = DATASETS[name].split(":")
    return getattr(importlib.import_module(module), function)


def dataset_options(name: str) -> list[str]:
    """The keyword arguments the loader of ``name`` accepts (e.g. ``size`` and ``min_images`` for clip art).

    Args:
        name: one of ``DATASETS``.
    """
    import inspect

    parameters = inspect.signature(_loader(name)).parameters.values()
    return [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def load_dataset(name: str, **kwargs: Any) -> ClassificationData:
    """Load a corpus by name (see the table above).

    Args:
        name: one of ``DATASETS``.
        kwargs: passed to the loader, e.g. ``root=`` to read from another folder.
    """
    return _loader(name)(**kwargs)
