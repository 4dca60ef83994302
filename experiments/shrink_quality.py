"""Quality of shrunk adapters: train a MiniLM LoRA (r=32) on WordNet, shrink it, compare accuracy and parameters.

For each seed: train all-MiniLM-L6-v2 with LoRA r=32 on every linear layer of its 6 blocks (query, key, value,
attention.output.dense, intermediate.dense, output.dense; classifier head trained whole) on a 16-class WordNet
gloss task; save it; shrink it with ``lora_fast.shrink.shrink`` at energy thresholds 0.99 / 0.95 / 0.9 / 0.8 and to a
parameter budget of a quarter of its LoRA parameters; reload every shrunk adapter into a fresh base model with
``lora_fast.load_adapter`` and evaluate it. Beside them, a uniform r=8 adapter (the same parameter budget) trained
directly, with the same data, steps and learning rate. Uses public APIs only.

Run: ``python experiments/shrink_quality.py`` (writes ``experiments/sample_results/shrink_quality/``: ``table.md``
and ``results.json``). ``--seeds``, ``--steps``, ``--classes`` change the scale; ``--keep DIR`` keeps the adapters
(``DIR/seed0-r32`` is a trained PEFT-format adapter to try ``lora-fast`` on).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# run as a script: the repository root on the path (appended: an installed lora_fast wins over the source folder)
sys.path.append(str(Path(__file__).resolve().parents[1]))

import torch

import lora_fast
from experiments.data import sampling
from experiments.data.wordnet import load_wordnet
from experiments.models.minilm import minilm_folder
from lora_fast.shrink import shrink
from lora_fast.train import TrainConfig
from lora_fast.train import evaluate
from lora_fast.train import train

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
THRESHOLDS = (0.99, 0.95, 0.9, 0.8)


def base_model(num_labels: int, seed: int) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    torch.manual_seed(seed)  # the fresh classifier head
    return AutoModelForSequenceClassification.from_pretrained(minilm_folder(), num_labels=num_labels)


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_folder())


def task(n_classes: int, train_size: int, eval_size: int):
    """A fixed n-class WordNet task (classes and examples drawn with seed 0), so seeds vary only the training."""
    corpus = load_wordnet()
    train_pool, test_pool = sampling.train_test_split(corpus, 0.2, seed=0)
    classes = sampling.sample_class_subsets(sampling.eligible_classes(corpus, 500), n_classes, 1, seed=0)[0]
    train_set = sampling.balanced_subset(train_pool, classes, train_size, seed=0)
    return train_set, sampling.balanced_subset(test_pool, classes, eval_size, seed=0)


def lora_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B")))


def run_seed(seed: int, args: argparse.Namespace, train_set, eval_set, tok, work: Path) -> list[dict]:
    config = TrainConfig(
        max_steps=args.steps, lr=args.lr, batch_size=16, seed=seed, max_length=48, progress=False, device="cpu"
    )
    n = train_set.num_classes
    rows = []

    def record(variant: str, model: torch.nn.Module, params: int, **extra) -> None:
        accuracy = evaluate(model, eval_set, config, tokenizer=tok)["accuracy"]
        rows.append({"seed": seed, "variant": variant, "params": params, "accuracy": accuracy, **extra})
        print(f"  seed {seed} {variant:<22} params {params:>9,}  accuracy {accuracy:.4f}", flush=True)

    started = time.perf_counter()
    model = lora_fast.inject(base_model(n, seed), TARGETS, r=32, alpha=32, modules_to_save=["classifier"])
    train(model, train_set, None, config, tokenizer=tok)
    original = work / f"seed{seed}-r32"
    lora_fast.save_adapter(model, original)
    full = lora_params(model)
    record("LoRA r=32 (original)", model, full, train_s=time.perf_counter() - started)

    variants = [(f"shrink threshold {t}", {"threshold": t}) for t in THRESHOLDS]
    variants.append(("shrink to 1/4 params", {"params": full // 4}))
    for variant, rule in variants:
        out = work / f"seed{seed}-{variant.replace(' ', '_').replace('/', '-')}"
        result = shrink(original, out, **rule)
        shrunk = lora_fast.load_adapter(base_model(n, seed + 1000), out)  # the head comes from the adapter
        record(variant, shrunk, result.params_after, relative_error=result.relative_error)

    started = time.perf_counter()
    uniform = lora_fast.inject(base_model(n, seed), TARGETS, r=8, alpha=8, modules_to_save=["classifier"])
    train(uniform, train_set, None, config, tokenizer=tok)
    record("LoRA r=8 trained", uniform, lora_params(uniform), train_s=time.perf_counter() - started)
    return rows


def table(rows: list[dict]) -> str:
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    seeds = sorted({r["seed"] for r in rows})
    by = {(r["variant"], r["seed"]): r for r in rows}
    full = statistics.mean(by["LoRA r=32 (original)", s]["params"] for s in seeds)
    lines = [
        "| adapter | LoRA params | of r=32 | accuracy (mean ± sd) | Δ vs r=32 (paired, mean ± sd) | rel. ‖ΔW − ΔW'‖ |",
        "|---|---|---|---|---|---|",
    ]
    for v in variants:
        acc = [by[v, s]["accuracy"] for s in seeds]
        delta = [by[v, s]["accuracy"] - by["LoRA r=32 (original)", s]["accuracy"] for s in seeds]
        params = statistics.mean(by[v, s]["params"] for s in seeds)
        err = [by[v, s].get("relative_error") for s in seeds]
        sd = lambda x: statistics.stdev(x) if len(x) > 1 else float("nan")
        lines.append(
            f"| {v} | {params:,.0f} | {100 * params / full:.0f}% | {statistics.mean(acc):.4f} ± {sd(acc):.4f} | "
            + (f"{statistics.mean(delta):+.4f} ± {sd(delta):.4f}" if v != "LoRA r=32 (original)" else "—")
            + " | "
            + (f"{statistics.mean(err):.3f}" if err[0] is not None else "—")
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="experiments/sample_results/shrink_quality")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--classes", type=int, default=16)
    parser.add_argument("--train-size", type=int, default=4000)
    parser.add_argument("--eval-size", type=int, default=1600)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--keep", metavar="DIR", help="keep the trained and shrunk adapters in DIR (seed0-r32, …)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    train_set, eval_set = task(args.classes, args.train_size, args.eval_size)
    tok = tokenizer()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="shrink-quality-") as temp:
        work = Path(args.keep or temp)
        work.mkdir(parents=True, exist_ok=True)
        for seed in range(args.seeds):
            rows += run_seed(seed, args, train_set, eval_set, tok, work)
    wall = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    setup = (
        f"all-MiniLM-L6-v2, LoRA on {', '.join(TARGETS)} of all 6 blocks (classifier head trained whole); WordNet "
        f"glosses, {args.classes} classes (lexicographer files), {len(train_set)} training / {len(eval_set)} eval "
        f"examples; {args.steps} steps of batch 16, lr {args.lr:g}, alpha = r; {args.seeds} seeds (training seed; "
        f"task fixed); {wall / 60:.1f} min wall, {args.threads} threads."
    )
    text = f"# Shrunk adapters vs the original and vs a uniform low-rank adapter\n\n{setup}\n\n{table(rows)}\n"
    (out / "table.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"setup": setup, "args": vars(args), "rows": rows}, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
