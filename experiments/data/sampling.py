"""Splits, class subsets with a fixed number of examples, and label noise; all deterministic given a seed."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence

import torch

from lora_fast.data import ClassificationData


def train_test_split(
    data: ClassificationData, test_fraction: float = 0.2, seed: int = 0
) -> tuple[ClassificationData, ClassificationData]:
    """Stratified split: each class keeps ``test_fraction`` of its examples (at least one) for the test part.

    The split depends only on ``seed``, so every class subset drawn later shares the same held-out pool.

    Args:
        data: the corpus.
        test_fraction: share of each class held out, in (0, 1).
        seed: shuffling seed.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    gen = torch.Generator().manual_seed(seed)
    train_idx: list[torch.Tensor] = []
    test_idx: list[torch.Tensor] = []
    for c in range(data.num_classes):
        idx = torch.nonzero(data.labels == c).flatten()
        if idx.numel() == 0:
            continue
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        n_test = max(1, round(test_fraction * idx.numel())) if idx.numel() > 1 else 0
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    return data.select(torch.cat(train_idx).sort().values), data.select(torch.cat(test_idx).sort().values)


def eligible_classes(data: ClassificationData, min_count: int) -> list[int]:
    """Classes with at least ``min_count`` examples, in label order."""
    return [c for c, k in enumerate(data.class_counts().tolist()) if k >= min_count]


def sample_class_subsets(classes: Sequence[int], n: int, k: int, seed: int = 0) -> list[tuple[int, ...]]:
    """``k`` distinct random ``n``-subsets of ``classes`` (fewer when fewer exist, e.g. one for n = len(classes)).

    Args:
        classes: the class ids to choose from.
        n: classes per subset, 1 <= n <= len(classes).
        k: number of subsets wanted.
        seed: sampling seed; the result for (classes, n, k, seed) never changes.
    """
    if not 1 <= n <= len(classes):
        raise ValueError(f"n={n} must be between 1 and {len(classes)}")
    pool = sorted(classes)
    total = math.comb(len(pool), n)
    rng = random.Random(f"{seed}-{n}")
    if total <= k:
        return [tuple(c) for c in itertools.combinations(pool, n)]
    chosen: list[tuple[int, ...]] = []
    while len(chosen) < k:
        subset = tuple(sorted(rng.sample(pool, n)))
        if subset not in chosen:
            chosen.append(subset)
    return chosen


def _per_class(total: int, n: int) -> list[int]:
    return [total // n + (1 if i < total % n else 0) for i in range(n)]


def balanced_subset(data: ClassificationData, classes: Sequence[int], size: int, seed: int = 0) -> ClassificationData:
    """``size`` examples spread evenly over ``classes``, relabelled ``0..len(classes)-1`` in the given order.

    Holding ``size`` fixed while ``len(classes)`` varies keeps the amount of training data constant, so results
    across class counts are not about data size.

    Args:
        data: the pool to draw from.
        classes: original class ids to keep.
        size: total examples; class i gets ``size // n`` (+1 for the first ``size % n`` classes).
        seed: sampling seed.
    """
    if len(set(classes)) != len(classes):
        raise ValueError("classes must be distinct")
    gen = torch.Generator().manual_seed(seed)
    picked: list[torch.Tensor] = []
    new_labels: list[torch.Tensor] = []
    for new, (c, want) in enumerate(zip(classes, _per_class(size, len(classes)), strict=True)):
        idx = torch.nonzero(data.labels == c).flatten()
        if idx.numel() < want:
            raise ValueError(f"class {data.class_names[c]!r} has {idx.numel()} examples, {want} needed for size={size}")
        picked.append(idx[torch.randperm(idx.numel(), generator=gen)[:want]])
        new_labels.append(torch.full((want,), new, dtype=torch.long))
    sub = data.select(torch.cat(picked))
    return sub.with_labels(torch.cat(new_labels), [data.class_names[c] for c in classes])


def add_label_noise(data: ClassificationData, p: float, seed: int = 0) -> ClassificationData:
    """Shuffle the labels of a random fraction ``p`` of the examples among themselves.

    The label histogram is unchanged; some shuffled labels land on their own class, so the share of wrong labels
    is about ``p * (1 - 1/num_classes)`` for balanced data (see ``noisy_fraction``).

    Args:
        data: the (training) examples.
        p: fraction of examples whose labels take part in the shuffle, in [0, 1].
        seed: sampling seed.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    m = round(p * len(data))
    if m < 2:
        return data
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data), generator=gen)[:m]
    labels = data.labels.clone()
    labels[idx] = data.labels[idx[torch.randperm(m, generator=gen)]]
    return data.with_labels(labels)


def noisy_fraction(clean: ClassificationData, noisy: ClassificationData) -> float:
    """Share of examples whose label differs between two versions of the same data."""
    return float((clean.labels != noisy.labels).float().mean())
