"""One LoRA linear layer, forward + backward (dX, dA, dB; W frozen), against PEFT and the frozen base linear.

Providers: ``base`` (the frozen ``nn.Linear`` alone, dX only: the floor, repeated in the dropout groups), ``peft``
(``peft.tuners.lora.Linear``, the baseline of the ratio table), ``ref`` (``lora_linear_ref``, plain PyTorch autograd),
``compile_ref`` (``torch.compile`` of the reference, GPU only) and ``ours`` (``LoraLinear`` -> ``lora_linear``: Triton
on CUDA, the addmm path on CPU).

Shapes: the published fused-LoRA setting (k = n = 4096, r = 16, 8192 tokens, bf16, dropout 0 and 0.1) and BERT-base
(k = n = 768, r = 16, 8 × 512 tokens) on a GPU; on a CPU, BERT-base at 2 × 512 tokens and a reduced 1024-wide
layer, fp32.

    pytest benchmarks/bench_lora_linear.py --benchmark-only            # CPU: ~1-2 min on 2 cores
    bash benchmarks/gpu_lora_linear.sh                                  # GPU: tests on the device, then all shapes

On CUDA the peak memory of one step (``torch.cuda.max_memory_allocated`` above the inputs) goes to
``extra_info["peak_mem_mb"]``.
"""

from __future__ import annotations

import subprocess

import pytest
import torch
from torch import nn

from lora_fast.layers import LoraLinear
from lora_fast.ops.lora_linear import lora_linear_ref

peft = pytest.importorskip("peft")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PROVIDERS = ["base", "peft", "ref", "compile_ref", "ours"]
# (id, tokens M, k, n, r, dtype, dropout)
if DEVICE == "cuda":
    SHAPES = [
        ("fused_lora_4096", 8192, 4096, 4096, 16, torch.bfloat16, 0.0),
        ("fused_lora_4096", 8192, 4096, 4096, 16, torch.bfloat16, 0.1),
        ("bert_base", 4096, 768, 768, 16, torch.bfloat16, 0.0),
        ("bert_base", 4096, 768, 768, 16, torch.bfloat16, 0.1),
    ]
    ROUNDS, WARMUP = 50, 10
else:
    SHAPES = [
        ("bert_base", 1024, 768, 768, 16, torch.float32, 0.0),
        ("bert_base", 1024, 768, 768, 16, torch.float32, 0.1),
        ("reduced_1024", 512, 1024, 1024, 16, torch.float32, 0.0),
    ]
    ROUNDS, WARMUP = 15, 3


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def _make_step(provider: str, M: int, k: int, n: int, r: int, dtype: torch.dtype, dropout: float):
    """A closure running one forward + backward of ``provider`` on fixed inputs."""
    gen = torch.Generator().manual_seed(0)
    base = nn.Linear(k, n).to(DEVICE, dtype).requires_grad_(False)
    x = torch.randn(M, k, generator=gen).to(DEVICE, dtype).requires_grad_(True)
    grad = torch.randn(M, n, generator=gen).to(DEVICE, dtype)
    lora_A = (torch.randn(r, k, generator=gen) / k**0.5).to(DEVICE, dtype)
    lora_B = (torch.randn(n, r, generator=gen) / r**0.5).to(DEVICE, dtype)
    scaling = 2.0

    if provider == "base":
        module = base
    elif provider == "peft":
        config = peft.LoraConfig(r=r, lora_alpha=r * scaling, lora_dropout=dropout)
        module = peft.tuners.lora.Linear(base, "default", config, r=r, lora_alpha=r * scaling, lora_dropout=dropout)
        module.to(DEVICE, dtype)
        with torch.no_grad():
            module.lora_A["default"].weight.copy_(lora_A)
            module.lora_B["default"].weight.copy_(lora_B)
    elif provider == "ours":
        module = LoraLinear(base, r, r * scaling, dropout=dropout)
        with torch.no_grad():
            module.lora_A.copy_(lora_A)
            module.lora_B.copy_(lora_B)
    else:
        A, B = lora_A.clone().requires_grad_(True), lora_B.clone().requires_grad_(True)
        fn = torch.compile(lora_linear_ref) if provider == "compile_ref" else lora_linear_ref

        def module(inp):
            keep = torch.rand_like(inp) >= dropout if dropout else None
            return fn(inp, base.weight, base.bias, A, B, scaling, keep, dropout)

    def step() -> None:
        module(x).backward(grad)
        x.grad = None
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    return step


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize(("shape_id", "M", "k", "n", "r", "dtype", "dropout"), SHAPES)
def test_lora_linear_fwd_bwd(benchmark, provider, shape_id, M, k, n, r, dtype, dropout) -> None:
    if provider == "compile_ref" and DEVICE != "cuda":
        pytest.skip("compile_ref is GPU-only: inductor's CPU compile takes longer than this file's whole CPU budget")
    step = _make_step(provider, M, k, n, r, dtype, dropout)
    peak_mb = None
    if DEVICE == "cuda":
        step()  # compile / autotune outside the measurement
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        peak_mb = (torch.cuda.max_memory_allocated() - before) / 2**20
    dtype_name = str(dtype).removeprefix("torch.")
    benchmark.group = f"{shape_id} M={M} k={k} n={n} r={r} {dtype_name} p={dropout}"
    benchmark.extra_info.update(
        {
            "provider": provider,
            "baseline": "peft",
            "ours": "ours",
            "shape": {"M": M, "k": k, "n": n},
            "rank": r,
            "dtype": dtype_name,
            "dropout": dropout,
            "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
            "torch": torch.__version__,
            "git": _git_sha(),
            "peak_mem_mb": peak_mb,
        }
    )
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
