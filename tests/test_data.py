from __future__ import annotations

import gzip
import math
import struct
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # after site-packages: the installed lora_fast (with _C) wins

from experiments import data  # noqa: E402
from experiments.data import MissingDataError  # noqa: E402
from experiments.data import sampling  # noqa: E402
from experiments.data.digits import load_digits  # noqa: E402
from experiments.data.fashion_mnist import load_fashion_mnist  # noqa: E402
from experiments.data.fortunes import load_fortunes  # noqa: E402
from experiments.data.wordnet import load_wordnet  # noqa: E402
from lora_fast.data import ClassificationData  # noqa: E402


def _toy(counts: list[int]) -> ClassificationData:
    labels = torch.cat([torch.full((k,), c) for c, k in enumerate(counts)])
    texts = tuple(f"text {i} of class {int(c)}" for i, c in enumerate(labels))
    return ClassificationData("toy", labels, tuple(f"c{c}" for c in range(len(counts))), texts=texts)


def test_wordnet_parses_synset_lines(tmp_path: Path) -> None:
    header = "  1 This software and database is being provided to you, the LICENSEE, by  \n"
    (tmp_path / "data.noun").write_text(
        header + "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived or known  \n"
        '00002137 05 n 01 dog 0 000 | a domesticated canid; "the dog barked"  \n'
    )
    for pos in ("verb", "adj", "adv"):
        (tmp_path / f"data.{pos}").write_text(header)
    (tmp_path / "data.verb").write_text(header + "00001740 29 v 01 breathe 0 000 | draw air into the lungs  \n")
    d = load_wordnet(tmp_path)
    assert d.texts == ("that which is perceived or known", 'a domesticated canid; "the dog barked"',
                       "draw air into the lungs")  # fmt: skip
    assert d.labels.tolist() == [3, 5, 29]
    assert d.num_classes == 45 and d.class_names[3] == "noun.Tops" and d.class_names[29] == "verb.body"


@pytest.mark.parametrize(
    ("loader", "package"),
    [
        (lambda root: load_wordnet(root), "wordnet-base"),
        (lambda root: load_fortunes(root), "fortunes"),
        (lambda root: load_fashion_mnist("train", root), "dataset-fashion-mnist"),
    ],
)
def test_missing_files_name_the_package(tmp_path: Path, loader, package: str) -> None:
    with pytest.raises(MissingDataError, match=package) as info:
        loader(tmp_path / "absent")
    assert isinstance(info.value, FileNotFoundError) and "absent" in str(info.value)


def test_digits_names_scikit_learn_when_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    with pytest.raises(MissingDataError, match="pip install scikit-learn"):
        load_digits()


def test_fortunes_split_and_index_files_skipped(tmp_path: Path) -> None:
    (tmp_path / "art").write_text("one\nline\n%\ntwo\n%\nthree\n%\n")
    (tmp_path / "art.dat").write_bytes(b"\x00\x02binary")
    (tmp_path / "zen").write_text("only\n")
    (tmp_path / "tiny").write_text("x\n")
    d = load_fortunes(tmp_path, min_count=1)
    assert d.class_names == ("art", "tiny", "zen")
    assert d.texts == ("one\nline", "two", "three", "x", "only")
    assert d.labels.tolist() == [0, 0, 0, 1, 2]
    assert load_fortunes(tmp_path, min_count=2).class_names == ("art",)


def _write_idx(path: Path, array: torch.Tensor) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.to(torch.uint8).numpy().tobytes())


def test_fashion_mnist_reads_idx(tmp_path: Path) -> None:
    images = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", torch.tensor([9, 0, 3], dtype=torch.uint8))
    d = load_fashion_mnist("test", tmp_path)
    assert d.inputs.shape == (3, 28, 28) and d.inputs.dtype == torch.float32
    torch.testing.assert_close(d.inputs * 255, images.float())
    assert d.labels.tolist() == [9, 0, 3] and d.class_names[9] == "Ankle boot"


@pytest.mark.skipif(not Path("/usr/share/wordnet/data.noun").is_file(), reason="Debian wordnet-base not installed")
def test_installed_wordnet() -> None:
    d = data.load_dataset("wordnet")
    assert len(d) == 117_659 and d.num_classes == 45
    assert len(sampling.eligible_classes(d, 500)) == 34


@pytest.mark.skipif(not Path("/usr/share/games/fortunes/art").is_file(), reason="Debian fortunes not installed")
def test_installed_fortunes() -> None:
    assert data.load_dataset("fortunes").num_classes == 43


def test_digits() -> None:
    d = data.load_dataset("digits")
    assert d.inputs.shape == (1797, 8, 8) and float(d.inputs.max()) == 1.0 and d.num_classes == 10


def test_unknown_dataset() -> None:
    with pytest.raises(KeyError, match="wordnet"):
        data.load_dataset("imagenet")


def test_registry_entries_resolve() -> None:
    import importlib

    for name, target in data.DATASETS.items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), name


def test_train_test_split_is_stratified_and_disjoint() -> None:
    d = _toy([50, 20, 10])
    train, test = sampling.train_test_split(d, 0.2, seed=1)
    assert test.class_counts().tolist() == [10, 4, 2]
    assert sorted(train.texts + test.texts) == sorted(d.texts)
    assert sampling.train_test_split(d, 0.2, seed=1)[1].texts == test.texts


def test_sample_class_subsets() -> None:
    subsets = sampling.sample_class_subsets(range(10), 3, 5, seed=0)
    assert len(subsets) == 5 == len(set(subsets)) and all(len(s) == 3 for s in subsets)
    assert subsets == sampling.sample_class_subsets(range(10), 3, 5, seed=0)
    assert subsets != sampling.sample_class_subsets(range(10), 3, 5, seed=1)
    # only C(4, 3) = 4 subsets exist
    assert len(sampling.sample_class_subsets(range(4), 3, 10)) == math.comb(4, 3)
    with pytest.raises(ValueError):
        sampling.sample_class_subsets(range(4), 5, 1)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_balanced_subset_holds_size_fixed(n: int) -> None:
    d = _toy([40] * 6)
    classes = [5, 1, 3, 0, 2][:n]
    sub = sampling.balanced_subset(d, classes, 30, seed=0)
    assert len(sub) == 30
    counts = sub.class_counts().tolist()
    assert sum(counts) == 30 and max(counts) - min(counts) <= 1
    assert sub.class_names == tuple(f"c{c}" for c in classes)
    # relabelled: new label i holds texts of original class classes[i]
    for text, label in zip(sub.texts, sub.labels.tolist(), strict=True):
        assert text.endswith(f"class {classes[label]}")
    with pytest.raises(ValueError, match="needed"):
        sampling.balanced_subset(d, [0, 1], 100)


def test_label_noise() -> None:
    d = _toy([100] * 4)
    assert sampling.add_label_noise(d, 0.0) is d
    noisy = sampling.add_label_noise(d, 0.5, seed=3)
    assert noisy.class_counts().tolist() == d.class_counts().tolist()
    wrong = sampling.noisy_fraction(d, noisy)
    # half the labels are shuffled among themselves; about 1/4 of those land on their own class again
    assert 0.3 < wrong <= 0.5
    assert noisy.texts == d.texts
    assert sampling.noisy_fraction(d, sampling.add_label_noise(d, 1.0, seed=3)) > 0.6
