"""LoRA linear op: ``y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ`` with W (n, k) frozen, A (r, k), B (n, r).

``lora_linear_ref`` is the plain-autograd oracle (tests, benchmarks). The op itself is registered as
``torch.ops.lora_fast.lora_linear`` / ``lora_linear_backward`` (``torch.library.custom_op`` + fake + autograd), and
``lora_linear`` calls it while torch.compile traces (``fullgraph=True`` works); eager calls apply the op's one
autograd definition (``_LoraLinearFunction``) directly, which skips the custom-op boundary's Python overhead.
``lora_linear`` also holds the dtype policy: ``nn.Linear``'s, autocast included (see its docstring). Each call picks
a backend with ``select_backend``: Triton kernels (``lora_fast.ops.triton.lora_linear``) for CUDA tensors, and for
CPU tensors a plain-PyTorch path that writes the LoRA term into the base output with ``addmm_`` (no ``s·…`` and
``+`` copies as in PEFT's ``result + lora_B(lora_A(x)) * s``) and computes only the gradients autograd asks for
(never dW of a frozen W).

The forward saves ``xa = dropout(x) Aᵀ`` (M×r) besides the inputs, never a second copy of x. With dropout the
Triton kernels regenerate the mask from the integer seed in backward (Philox, free on a GPU); the PyTorch path saves
a bool mask instead (M×k bytes, what PEFT's ``nn.Dropout`` saves too) because drawing it on the CPU costs as much as
the M×k×k GEMM (2048×768: 21 ms for ``bernoulli_`` vs 29 ms for the matmul, 2 cores).
"""

from __future__ import annotations

import functools
import os
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from lora_fast.ops._backend import select_backend

__all__ = ["autocast_dtype", "dropout_keep_mask", "lora_linear", "lora_linear_ref"]

_IMPLEMENTED = ("ref", "triton")
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def lora_linear_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    keep_mask: Tensor | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Plain-PyTorch LoRA linear, differentiated by autograd; the oracle for every fast path.

    Args:
        x: input (..., k).
        weight: base weight (n, k).
        bias: base bias (n,) or None.
        lora_A: down projection (r, k).
        lora_B: up projection (n, r).
        scaling: the LoRA scale s (alpha / r, or alpha / sqrt(r) for rsLoRA).
        keep_mask: boolean mask of x's shape for dropout on the LoRA branch, or None for no dropout.
        dropout_p: the dropout probability the kept entries are rescaled by (1 / (1 - p)).
    """
    lora_in = x if keep_mask is None else x * keep_mask / (1.0 - dropout_p)
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(lora_in, lora_A), lora_B)


def dropout_keep_mask(shape: tuple[int, int], dropout_p: float, seed: int, device: torch.device | str) -> Tensor:
    """The keep mask (M, k) that the PyTorch backend draws for ``seed``; Triton draws its own (Philox in-kernel).

    Args:
        shape: (M, k), the flattened input's shape.
        dropout_p: drop probability.
        seed: the integer seed passed to the op.
        device: where to draw the mask.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    # bernoulli_ into bool: 21 ms vs 27 ms for ``rand(...) >= p`` at 2048×768 (no fp32 temporary)
    return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1.0 - dropout_p, generator=generator)


def _backend_for(x: Tensor) -> str:
    # memoised on what the choice depends on (the forced backend is read by select_backend, here it is only part
    # of the key): select_backend reads the environment and probes modules, ~20 µs paid twice per layer and step
    env = (os.environ.get("LORA_FAST_BACKEND"), os.environ.get("TRITON_INTERPRET"))
    return _choose_backend(x.device, x.dtype, *env)


@functools.lru_cache(maxsize=64)
def _choose_backend(device: torch.device, dtype: torch.dtype, forced: str | None, interpret: str | None) -> str:
    backend = select_backend(device, _IMPLEMENTED)  # raises for a forced backend that cannot run on ``device``
    return "ref" if backend == "triton" and dtype not in _TRITON_DTYPES else backend


def _forward_torch(
    x2: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, scaling: float, p: float, seed: int
) -> tuple[Tensor, Tensor, Tensor]:
    if p == 0.0:
        keep = x2.new_empty(0, dtype=torch.bool)
        xa = torch.mm(x2, lora_A.t())
    else:
        keep = dropout_keep_mask(x2.shape, p, seed, x2.device)
        # the 1 / (1 - p) rescale goes on the M×r product, not on the M×k input; where() instead of x * keep because
        # a float×bool product first casts the mask to float (2× the time at 1024×768)
        xa = torch.mm(torch.where(keep, x2, 0.0), lora_A.t()).mul_(1.0 / (1.0 - p))
    y = torch.mm(x2, weight.t()) if bias is None else torch.addmm(bias, x2, weight.t())
    y.addmm_(xa, lora_B.t(), alpha=scaling)
    return y, xa, keep


def _backward_torch(
    dy2: Tensor,
    x2: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    xa: Tensor,
    keep: Tensor,
    scaling: float,
    p: float,
    needs: list[bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    need_x, _, need_bias, need_A, need_B = needs
    dx = d_A = d_B = d_bias = None
    if need_x or need_A:
        # fp32: MKL's sgemm takes 446 µs for dY·B with B (n, r) row-major and 187 µs with B the transpose of a
        # row-major (r, n) copy (M=1024, n=384, r=8, 1 thread); oneDNN's bf16 kernel prefers B as it is (83 vs 114)
        b = lora_B.t().contiguous().t() if lora_B.dtype == torch.float32 else lora_B
        # s and 1 / (1 - p) folded into the small M×r term once instead of into an M×k or M×n product
        dyb = torch.mm(dy2, b).mul_(scaling / (1.0 - p))
    if need_x:
        if p == 0.0:
            dx = torch.mm(dy2, weight)
            dx.addmm_(dyb, lora_A)
        else:
            # masked LoRA term first, then the big GEMM accumulates into it in place (no extra M×k pass)
            dx = torch.where(keep, torch.mm(dyb, lora_A), 0.0)
            dx.addmm_(dy2, weight)
    if need_A:
        d_A = torch.mm(dyb.t(), x2 if p == 0.0 else torch.where(keep, x2, 0.0))
    if need_B:
        # (xaᵀ dY)ᵀ rather than dYᵀ xa: 191 vs 660 µs in fp32, 75 vs 226 µs in bf16 (same shapes as above)
        d_B = torch.mm(xa.t(), dy2).t().mul_(scaling)
    if need_bias:
        d_bias = dy2.sum(0)
    return dx, d_A, d_B, d_bias


def _saves_mask(x: Tensor, dropout_p: float) -> bool:
    return dropout_p > 0.0 and _backend_for(x) == "ref"


def _forward_impl(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, scaling: float, p: float, seed: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, xa, keep) on the selected backend; keep is the saved bool mask, or empty when nothing is saved."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if _backend_for(x) == "triton":
        from lora_fast.ops.triton import lora_linear as triton_impl

        y, xa = triton_impl.lora_linear_fwd(x2, weight, bias, lora_A, lora_B, scaling, p, seed)
        keep = x.new_empty(0, dtype=torch.bool)
    else:
        y, xa, keep = _forward_torch(x2, weight, bias, lora_A, lora_B, scaling, p, seed)
    keep = keep.view(x.shape) if keep.numel() else keep
    return y.view(*lead, weight.shape[0]), xa.view(*lead, lora_A.shape[0]), keep


def _backward_impl(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    xa: Tensor,
    keep: Tensor,
    scaling: float,
    p: float,
    seed: int,
    needs: list[bool],
) -> list[Tensor | None]:
    """[dx, dW, dbias, dA, dB] on the selected backend, None where ``needs`` is False."""
    k, n, r = x.shape[-1], weight.shape[0], lora_A.shape[0]
    x2, dy2, xa2 = x.reshape(-1, k), dy.reshape(-1, n), xa.reshape(-1, r)
    if _backend_for(x) == "triton":
        from lora_fast.ops.triton import lora_linear as triton_impl

        dx, d_A, d_B, d_bias = triton_impl.lora_linear_bwd(
            dy2, x2, weight, lora_A, lora_B, xa2, scaling, p, seed, needs
        )
    else:
        keep2 = keep.reshape(-1, k) if keep.numel() else keep
        dx, d_A, d_B, d_bias = _backward_torch(dy2, x2, weight, lora_A, lora_B, xa2, keep2, scaling, p, needs)
    # a frozen base weight gets no dW; a trainable one gets the plain dense product (no LoRA term in it)
    d_W = torch.mm(dy2.t(), x2) if needs[1] else None
    return [dx.view(x.shape) if dx is not None else None, d_W, d_bias, d_A, d_B]


@torch.library.custom_op("lora_fast::lora_linear", mutates_args=())
def _lora_linear_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, xa, keep): xa = dropout(x) Aᵀ (..., r) and the bool keep mask (..., k) or an empty one, both for backward."""
    return _forward_impl(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


@_lora_linear_op.register_fake
def _lora_linear_fake(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    lead = x.shape[:-1]
    keep_shape = x.shape if _saves_mask(x, dropout_p) else (0,)
    return (
        x.new_empty((*lead, weight.shape[0])),
        x.new_empty((*lead, lora_A.shape[0])),
        x.new_empty(keep_shape, dtype=torch.bool),
    )


@torch.library.custom_op("lora_fast::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    xa: Tensor,
    keep: Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
    needs: list[bool],
) -> list[Tensor]:
    """Gradients (dx, dW, dbias, dA, dB); an entry whose ``needs`` flag is False comes back as an empty tensor."""
    grads = _backward_impl(dy, x, weight, lora_A, lora_B, xa, keep, scaling, dropout_p, seed, needs)
    # outputs of a custom op may not alias each other: one fresh empty tensor per missing gradient; and they must be
    # laid out as the fake kernel says (dB comes out transposed, an n×r copy)
    return [g.contiguous() if g is not None else x.new_empty(0) for g in grads]


@_lora_linear_backward_op.register_fake
def _lora_linear_backward_fake(dy, x, weight, lora_A, lora_B, xa, keep, scaling, dropout_p, seed, needs):
    shapes = [x.shape, weight.shape, (weight.shape[0],), lora_A.shape, lora_B.shape]
    return [x.new_empty(shape) if need else x.new_empty(0) for shape, need in zip(shapes, needs, strict=True)]


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed = inputs
    _, xa, keep = output
    ctx.save_for_backward(x, weight, lora_A, lora_B, xa, keep)
    ctx.mark_non_differentiable(xa, keep)
    ctx.set_materialize_grads(False)  # no zero-filled M×r gradient for xa, which only backward reads
    ctx.scaling, ctx.dropout_p, ctx.seed = scaling, dropout_p, seed
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y, grad_xa, grad_keep):
    need_x, need_W, need_bias, need_A, need_B = ctx.needs_input_grad[:5]
    needs = [need_x, need_W, need_bias and ctx.has_bias, need_A, need_B]
    if grad_y is None:  # y did not reach the loss
        return None, None, None, None, None, None, None, None
    x, weight, lora_A, lora_B, xa, keep = ctx.saved_tensors
    args = (grad_y.contiguous(), x, weight, lora_A, lora_B, xa, keep, ctx.scaling, ctx.dropout_p, ctx.seed, needs)
    if torch.compiler.is_compiling():
        grads = [g if need else None for g, need in zip(_lora_linear_backward_op(*args), needs, strict=True)]
    else:
        grads = _backward_impl(*args)
    return (*grads, None, None, None)


class _LoraLinearFunction(torch.autograd.Function):
    """The op's one autograd definition (``_setup_context`` + ``_backward``, also registered on the op), applied
    directly in eager mode, without the custom-op boundary (Python autograd kernel, redispatch, a second op for
    backward, empty placeholders for unneeded gradients): at M=32, k=n=64, r=16 a forward+backward takes 0.42-0.46 ms
    this way and 0.54-0.60 ms through the op (1 thread, min of 6×500 steps, 2 runs on a loaded 2-core CPU), a saving
    paid per adapted layer and step.

    ``_backward`` calls the registered backward op only while torch.compile traces it (the graph then holds one
    opaque node, which the Triton kernels need: they cannot run on fake tensors), and the implementation directly
    otherwise. ``forward`` takes ``ctx`` rather than defining ``setup_context``: with the latter, ``apply`` binds
    the arguments through ``inspect.signature`` at every call, 120 µs here (measured with cProfile).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
        output = _forward_impl(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
        _setup_context(ctx, (x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed), output)
        return output

    backward = staticmethod(_backward)


_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype ``torch.autocast`` runs ``nn.Linear`` in on ``device_type`` right now, or None when it is off.

    Args:
        device_type: ``"cpu"``, ``"cuda"``, … (a tensor's ``device.type``).
    """
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _autocast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    # autocast's rule for its lower-precision ops: floating tensors other than float64 are cast, the rest pass
    if t is None or not t.is_floating_point() or t.dtype in (dtype, torch.float64):
        return t
    return t.to(dtype)


_last_input_cast = threading.local()


def _autocast_input(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``_autocast(x)``, reusing the previous call's cast when it was of this very x (same object and version).

    Adapted q/k/v projections read one input: one cast instead of three, and in backward autograd sums their three
    input gradients in ``dtype`` before one cast back instead of casting each. autocast itself re-casts tensors
    that are not leaves at every call. Holds one cast input (and the graph behind it) until the next call.
    """
    if x.dtype in (dtype, torch.float64) or not x.is_floating_point() or torch.compiler.is_compiling():
        return _autocast(x, dtype)
    key = (x._version, dtype, torch.is_grad_enabled())
    last = getattr(_last_input_cast, "entry", None)
    if last is not None and last[0]() is x and last[1] == key:
        return last[2]
    cast = x.to(dtype)
    _last_input_cast.entry = (weakref.ref(x), key, cast)
    return cast


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: int | None = None,
) -> Tensor:
    """``x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ`` through the registered op (autograd, autocast, torch.compile, dispatch).

    dtypes follow ``nn.Linear``: all inputs share one dtype, except under ``torch.autocast`` for x's device type,
    where every floating input but float64 is cast to the autocast dtype first (CPU: bf16 or fp16; CUDA: fp16 or
    bf16) and y comes out in it. The casts are differentiable, so fp32 LoRA factors (master weights) get fp32
    gradients, computed in the autocast dtype as PEFT's under the same autocast.

    Args:
        x: input (..., k).
        weight: base weight (n, k); gets a gradient only if it requires one.
        bias: base bias (n,) or None.
        lora_A: down projection (r, k).
        lora_B: up projection (n, r).
        scaling: the LoRA scale s.
        dropout_p: dropout probability on the LoRA branch's input, in [0, 1).
        seed: dropout seed; the same seed gives the same mask. None draws one from torch's global generator
            (a graph break under torch.compile: pass an int there).
    """
    k, n, r = weight.shape[1], weight.shape[0], lora_A.shape[0]
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features but the weight (n={n}, k={k}) expects k={k}")
    if lora_A.dim() != 2 or lora_A.shape[1] != k or r < 1:
        raise ValueError(f"lora_A must be (r >= 1, k={k}), got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (n, r):
        raise ValueError(f"lora_B must be (n={n}, r={r}), got {tuple(lora_B.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must be ({n},), got {tuple(bias.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    cast_to = autocast_dtype(x.device.type)
    if cast_to is not None:
        x = _autocast_input(x, cast_to)
        weight, bias, lora_A, lora_B = (_autocast(t, cast_to) for t in (weight, bias, lora_A, lora_B))
    if len({x.dtype, weight.dtype, lora_A.dtype, lora_B.dtype} | ({bias.dtype} if bias is not None else set())) > 1:
        raise TypeError(
            f"dtype mismatch: x {x.dtype}, weight {weight.dtype}, lora_A {lora_A.dtype}, lora_B {lora_B.dtype}"
            + (f", bias {bias.dtype}" if bias is not None else "")
        )
    if dropout_p > 0.0 and seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
    args = (x, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p), seed or 0)
    if torch.compiler.is_compiling():
        return torch.ops.lora_fast.lora_linear(*args)[0]
    return _LoraLinearFunction.apply(*args)[0]
