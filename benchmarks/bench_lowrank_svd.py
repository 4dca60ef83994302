"""Singular values of every adapter of a model: lora_fast vs what a user would run instead, and the read floor.

Providers: ``lora_fast`` (``singular_values`` on the list of adapters, as users call it: the native library on
CPU, batched torch ops on CUDA), ``torch_qr`` (the same algorithm as torch ops on adapters pre-stacked per shape, their
best case: ``torch.linalg.qr`` of B and Aᵀ + ``svdvals`` of the core; the baseline of the ratio table), ``ref`` (our
float64 PyTorch oracle, ``lowrank_svdvals_ref``, pre-stacked), ``dense_svd`` (``svdvals`` of the formed B@A, what
papers and PEFT do), ``svd_lowrank`` (``torch.svd_lowrank`` of the formed product, q=r) and ``read_floor`` (one
``sum`` over the stacked factors: the time to read the same bytes once, the floor of any method).

Shapes: BERT-base (36 adapters 768×768, r ∈ {8, 16, 64}) and a 7B LLaMA-style model (32 layers × q,k,v,o
4096×4096 + gate/up 4096→11008 + down 11008→4096, r=16: 224 adapters, 160 MB of float32 factors; also in bfloat16,
which lora_fast reads as it is).

Run: ``pytest benchmarks/bench_lowrank_svd.py --benchmark-only``. The dense SVD and ``svd_lowrank`` of 224 7B-size
adapters take minutes to hours on 2 cores and are skipped unless ``LORA_FAST_BENCH_DENSE_7B=1``. On a shared machine,
``python benchmarks/bench_lowrank_svd.py`` takes the ratios of the fast providers interleaved (see ``interleaved``).
"""

from __future__ import annotations

import functools
import math
import os
import statistics
import time

import pytest
import torch

from lora_fast.energy_rank import energy_rank
from lora_fast.energy_rank import singular_values
from lora_fast.ops.lowrank_svd import lowrank_svdvals_ref

PROVIDERS = ["lora_fast", "torch_qr", "ref", "dense_svd", "svd_lowrank", "read_floor"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def bert_base(r: int) -> list[tuple[int, int, int]]:
    return [(768, 768, r)] * 36  # 12 layers × q, k, v


def llama_7b(r: int = 16) -> list[tuple[int, int, int]]:
    # ordered by shape (the order of adapters does not change any timing) so grouped outputs follow input order
    return [(4096, 4096, r)] * (4 * 32) + [(11008, 4096, r)] * (2 * 32) + [(4096, 11008, r)] * 32


# id -> (shapes, dtype)
SHAPES = {f"bert-base-r{r}": (bert_base(r), torch.float32) for r in (8, 16, 64)} | {
    "llama-7b-r16": (llama_7b(), torch.float32),
    "llama-7b-r16-bf16": (llama_7b(), torch.bfloat16),
}


def make_adapters(shapes, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    a_list, b_list = [], []
    for m, n, r in shapes:
        # a trained-looking adapter: a few strong directions over a noise floor, B random (not zero)
        a = torch.randn(r, n, generator=g) / math.sqrt(n)
        b = torch.randn(m, r, generator=g) * torch.logspace(0, -2, r).unsqueeze(0)
        a_list.append(a.to(device, dtype))
        b_list.append(b.to(device, dtype))
    return a_list, b_list


def stacked(a_list, b_list):
    """Adapters grouped by shape and stacked, so the torch baselines get batched calls (their best case)."""
    groups: dict[tuple, tuple[list, list]] = {}
    for a, b in zip(a_list, b_list, strict=True):
        key = (tuple(a.shape), tuple(b.shape))
        groups.setdefault(key, ([], []))
        groups[key][0].append(a)
        groups[key][1].append(b)
    return [(torch.stack(a), torch.stack(b)) for a, b in groups.values()]


def torch_qr(groups):
    out = []
    for a, b in groups:
        if a.dtype not in (torch.float32, torch.float64):  # torch's QR has no half-precision kernel
            a, b = a.float(), b.float()
        r_b = torch.linalg.qr(b, mode="r").R
        r_a = torch.linalg.qr(a.mT, mode="r").R
        out.append(torch.linalg.svdvals(r_b @ r_a.mT))
    return out


def dense_svd(groups):
    return [torch.linalg.svdvals(b.float() @ a.float())[..., : a.shape[-2]] for a, b in groups]


def svd_lowrank(groups):
    out = []
    for a, b in groups:
        for i in range(a.shape[0]):
            out.append(torch.svd_lowrank(b[i].float() @ a[i].float(), q=a.shape[-2], niter=2)[1])
    return out


def read_floor(groups):
    return [(a.sum(), b.sum()) for a, b in groups]


def reference_sigma(a_list, b_list) -> list[torch.Tensor]:
    """float64 σ of every adapter: the dense SVD at BERT size, the float64 QR route at 7B size (dense is hours)."""
    if a_list[0].shape[-1] <= 1024:
        return [
            torch.linalg.svdvals(b.double() @ a.double())[: a.shape[0]] for a, b in zip(a_list, b_list, strict=True)
        ]
    return lowrank_svdvals_ref([a.double() for a in a_list], [b.double() for b in b_list], [1.0] * len(a_list))


_REFERENCE: dict[tuple[str, str], list[torch.Tensor]] = {}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape_id", list(SHAPES))
@pytest.mark.parametrize("device", DEVICES)
def test_lowrank_svd(benchmark, machine, sync, provider, shape_id, device):
    shapes, dtype = SHAPES[shape_id]
    is_7b = shape_id.startswith("llama")
    slow_7b = provider in ("dense_svd", "svd_lowrank") and is_7b and device == "cpu"
    if slow_7b and not os.environ.get("LORA_FAST_BENCH_DENSE_7B"):
        pytest.skip(f"{provider} of 224 7B-size adapters takes minutes to hours on CPU (LORA_FAST_BENCH_DENSE_7B=1)")
    a_list, b_list = make_adapters(shapes, device, dtype)
    groups = stacked(a_list, b_list)

    if provider == "lora_fast":
        fn = lambda: singular_values(a_list, b_list)
    elif provider == "ref":
        fn = lambda: lowrank_svdvals_ref([a for a, _ in groups], [b for _, b in groups], [1.0] * len(groups))
    else:
        fn = {"torch_qr": torch_qr, "dense_svd": dense_svd, "svd_lowrank": svd_lowrank, "read_floor": read_floor}
        fn = (lambda f: lambda: f(groups))(fn[provider])

    benchmark.group = f"{shape_id}-{device}"
    benchmark.extra_info.update(
        provider=provider,
        baseline="torch_qr",
        ours="lora_fast",
        adapters=len(shapes),
        shape=f"{shapes[0][0]}x{shapes[0][1]}" + ("+4096x11008" if is_7b else ""),
        rank=shapes[0][2],
        dtype=str(dtype).removeprefix("torch."),
        device=device,
        bytes=sum(a.nbytes + b.nbytes for a, b in zip(a_list, b_list, strict=True)),
        **machine,
    )

    def run():
        out = fn()
        sync(device)
        return out

    slow = provider in ("dense_svd", "svd_lowrank") or (is_7b and provider == "ref")
    out = benchmark.pedantic(run, rounds=1, iterations=1) if slow else benchmark(run)

    if provider in ("svd_lowrank", "read_floor"):  # randomized (approximate by design) / no σ at all
        benchmark.extra_info.update(max_sigma_err_rel=None, note="randomized" if provider == "svd_lowrank" else "")
        return
    sigma = out if provider == "lora_fast" else [s for t in out for s in t]  # groups follow the input order
    key = (shape_id, device)
    if key not in _REFERENCE:
        _REFERENCE[key] = reference_sigma([a.cpu() for a in a_list], [b.cpu() for b in b_list])
    ref = _REFERENCE[key]
    err = max(((s.double().cpu() - t).abs().max() / t.max()).item() for s, t in zip(sigma, ref, strict=True))
    ranks_equal = energy_rank([s.double().cpu() for s in sigma]) == energy_rank(ref)
    benchmark.extra_info.update(
        max_sigma_err_rel=err,
        energy_ranks_equal_reference=ranks_equal,
        note=f"max σ err/σmax {err:.1e}, energy ranks {'==' if ranks_equal else '!='} reference",
    )


def interleaved(rounds: int, shape_ids: list[str]) -> None:
    """Ratios on a shared machine: the fast providers in turn, round after round, medians per provider.

    pytest-benchmark times one provider after another, so load that comes and goes lands on some providers and
    not on others; here every round runs each provider once, and a ratio is taken between medians of the same
    rounds. Run: ``python benchmarks/bench_lowrank_svd.py [--rounds N] [shape ids]``.
    """
    print(f"interleaved medians over {rounds} rounds; torch {torch.__version__}, {torch.get_num_threads()} threads")
    header = ("shape", "lora_fast", "torch_qr", "read_floor", "vs torch_qr", "GB/s", "floor GB/s")
    print(f"{header[0]:<20}" + "".join(f"{h:>12}" for h in header[1:]))
    for shape_id in shape_ids:
        shapes, dtype = SHAPES[shape_id]
        a_list, b_list = make_adapters(shapes, "cpu", dtype)
        groups = stacked(a_list, b_list)
        fns = {
            "lora_fast": functools.partial(singular_values, a_list, b_list),
            "torch_qr": functools.partial(torch_qr, groups),
            "read_floor": functools.partial(read_floor, groups),
        }
        times: dict[str, list[float]] = {name: [] for name in fns}
        for fn in fns.values():  # warm-up
            fn()
        for _ in range(rounds):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        med = {name: statistics.median(t) for name, t in times.items()}
        size = sum(a.nbytes + b.nbytes for a, b in zip(a_list, b_list, strict=True))
        print(
            f"{shape_id:<20}{med['lora_fast'] * 1e3:>10.3f}ms{med['torch_qr'] * 1e3:>10.3f}ms"
            f"{med['read_floor'] * 1e3:>10.3f}ms{med['torch_qr'] / med['lora_fast']:>11.1f}x"
            f"{size / med['lora_fast'] / 1e9:>12.1f}{size / med['read_floor'] / 1e9:>12.1f}"
        )


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=interleaved.__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for every provider")
    parser.add_argument("shapes", nargs="*", help=f"shape ids, default all: {', '.join(SHAPES)}")
    args = parser.parse_args()
    unknown = sorted(set(args.shapes) - set(SHAPES))
    if unknown:
        parser.error(f"unknown shape ids {unknown}; known: {', '.join(SHAPES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    interleaved(args.rounds, args.shapes or list(SHAPES))
