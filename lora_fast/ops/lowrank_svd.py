"""The spectral op: singular values of many LoRA updates ``s·B·A`` without forming the m×n product.

One op, one unit: every rule of this op lives here, and callers (``lora_fast.energy_rank``) only collect adapters.

- ``lowrank_svdvals_ref`` is the oracle, in plain PyTorch: per adapter, Householder QR of B and of Aᵀ in float64 and
  the singular values of the small core ``R_B R_Aᵀ``, after bringing each factor to max |x| ~ 1 by a power of two
  (exact), so that nothing overflows or underflows where σ itself is representable.
- ``svdvals`` runs the op: input checks, the dtype policy, NaN/Inf checks (once per call), the routing between the
  low-rank route and the dense SVD of the formed product (``prefers_dense_route``), and the backends: the native
  library on CPU (``_native.py``: Cholesky-QR on float64 Gram matrices, thresholds below, one call for every
  adapter), and torch ops elsewhere (CUDA, or ``LORA_FAST_BACKEND=ref``), one batched call per distinct shape.
- ``lowrank_svdvals`` is the one registration (``lora_fast::lowrank_svdvals``, with its fake for torch.compile).
"""

from __future__ import annotations

import math
import numbers
import operator
from array import array
from collections.abc import Sequence
from itertools import repeat
from typing import Any

import torch
from torch import Tensor

from lora_fast.ops import _native
from lora_fast.ops._backend import select_backend

# Cholesky-QR's σ error grows like eps·ratio² with ratio = max/min of diag(R): 1e3 keeps float64 within ~1e-10 of
# σ_max; float32 and half inputs are exact in float64 and need only 1e-5, so 1e5 is safe. The native kernel
# re-factors a factor beyond its ratio with Householder QR.
MAX_CHOLESKY_RATIO = {torch.float64: 1e3, torch.float32: 1e5, torch.bfloat16: 1e5, torch.float16: 1e5}
# The accuracy this op guarantees, relative to σ_max of each adapter, against a float64 dense SVD of the product.
# Half precision is held to float32's bar. The native kernel picks its core solver from it.
SIGMA_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
# Types the native kernel reads as they are; anything else floating is converted (see check_pair).
_KERNEL_DTYPES = {torch.float32, torch.float64, torch.bfloat16, torch.float16}
# what the native kernel gets per dtype: (max Cholesky ratio, σ accuracy), looked up once per adapter
_NATIVE_PARAMS = {dtype: (MAX_CHOLESKY_RATIO[dtype], SIGMA_TOLERANCE[dtype]) for dtype in _KERNEL_DTYPES}


def result_dtype(dtype: torch.dtype) -> torch.dtype:
    """σ's dtype for factors of ``dtype``: float64 stays, everything else is reported in float32.

    Half precision is analysed in float32: bfloat16/float16 values widen exactly, and their own precision is far
    below what σ needs, so float32 output loses nothing.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_pair(a: Any, b: Any, where: str) -> tuple[Tensor, Tensor]:
    """Validates one adapter (A (..., r, n), B (..., m, r)); returns both in one dtype the op reads.

    Raises:
        ValueError: naming the problem (types, ndim, batch dims, inner ranks, empty, dtype, devices).
    """
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise ValueError(f"{where}: A and B must be tensors, got {type(a).__name__} and {type(b).__name__}")
    shape_a, shape_b = a.shape, b.shape
    if len(shape_a) < 2 or len(shape_b) < 2:
        raise ValueError(f"{where}: A must be (..., r, n) and B (..., m, r); got ndim {a.ndim} and {b.ndim}")
    if (len(shape_a) > 2 or len(shape_b) > 2) and shape_a[:-2] != shape_b[:-2]:
        raise ValueError(f"{where}: leading (batch) dims differ: A {tuple(shape_a)}, B {tuple(shape_b)}")
    if shape_a[-2] != shape_b[-1]:
        raise ValueError(
            f"{where}: inner ranks differ: A {tuple(shape_a)} has r={shape_a[-2]}, "
            f"B {tuple(shape_b)} has r={shape_b[-1]}"
        )
    if a.numel() == 0 or b.numel() == 0:
        raise ValueError(f"{where}: empty adapter, A {tuple(a.shape)}, B {tuple(b.shape)}")
    if not (a.is_floating_point() and b.is_floating_point()):
        raise ValueError(f"{where}: A and B must be floating point, got {a.dtype} and {b.dtype}")
    if not (a.is_cpu and b.is_cpu) and a.device != b.device:
        raise ValueError(f"{where}: A is on {a.device} but B is on {b.device}")
    if a.dtype == b.dtype and a.dtype in _KERNEL_DTYPES:
        return a, b
    dtype = result_dtype(torch.promote_types(a.dtype, b.dtype))
    return a.to(dtype), b.to(dtype)


def _finite_float(value: Any, where: str) -> float:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{where}: scaling must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{where}: scaling must be finite, got {value}")
    return value


def check_scalings(scaling: Any, count: int, where: str) -> list[float]:
    """One finite float per adapter, from a number (0-d tensors and numpy scalars included) or a sequence of them.

    Raises:
        ValueError: naming ``scaling`` when it is not a number or a sequence of ``count`` numbers, or not finite.
    """
    if isinstance(scaling, (numbers.Real, Tensor)) and not (isinstance(scaling, Tensor) and scaling.ndim > 0):
        return [_finite_float(scaling, where)] * count
    if hasattr(scaling, "ndim") and getattr(scaling, "ndim", 1) == 0:  # numpy 0-d array
        return [_finite_float(scaling.item(), where)] * count
    if isinstance(scaling, (str, bytes)) or not hasattr(scaling, "__len__"):
        raise ValueError(
            f"{where}: scaling must be a number or one number per adapter, got {type(scaling).__name__} {scaling!r}"
        )
    values = scaling.tolist() if hasattr(scaling, "tolist") else list(scaling)
    if len(values) != count:
        raise ValueError(f"{where}: {len(values)} scalings for {count} adapters")
    if set(map(type, values)) == {float} and all(map(math.isfinite, values)):
        return values  # the usual list of finite floats, checked at ~20 ns per value instead of ~300
    return [_finite_float(v, where) for v in values]


def batch_scaling(scaling: Any, lead: torch.Size, device: torch.device, where: str) -> float | Tensor:
    """|s| for a batched adapter with leading dims ``lead``: a float, or a float64 tensor broadcast to ``lead``.

    Raises:
        ValueError: not a number or a tensor/array broadcastable to ``lead``, or not finite.
    """
    if isinstance(scaling, numbers.Real) or (hasattr(scaling, "ndim") and scaling.ndim == 0):
        return abs(_finite_float(scaling.item() if hasattr(scaling, "item") else scaling, where))
    if isinstance(scaling, (str, bytes)) or not hasattr(scaling, "__len__"):
        raise ValueError(
            f"{where}: scaling must be a number or a tensor broadcastable to the batch dims {tuple(lead)}, "
            f"got {type(scaling).__name__} {scaling!r}"
        )
    try:
        values = torch.as_tensor(scaling, dtype=torch.float64, device=device)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{where}: scaling {scaling!r} is not numeric") from exc
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{where}: scaling contains NaN or Inf")
    try:
        return values.abs().expand(lead)
    except RuntimeError as exc:
        raise ValueError(
            f"{where}: scaling of shape {tuple(values.shape)} does not broadcast to the batch dims {tuple(lead)}"
        ) from exc


def prefers_dense_route(r: int, m: int, n: int) -> bool:
    """True when forming the m×n product and taking its SVD is cheaper than the QR route.

    Rough flop counts, with ~10·d³ for a d×d SVD: QR route (m+n)·r² (Gram matrices) + 10·r³ (core SVD); dense
    route 2·m·n·r (product) + 10·min(m,n)²·max(m,n). Always dense when r ≥ min(m, n): the core is no smaller.
    """
    lo, hi = min(m, n), max(m, n)
    if r >= lo:
        return True
    return 2.0 * m * n * r + 10.0 * lo * lo * hi < (m + n) * r * r + 10.0 * r**3


# ---------------------------------------------------------------------------------------------------------------
# Reference (plain PyTorch)


def times_pow2(x: Tensor, exponent: Tensor) -> Tensor:
    """x · 2^exponent, one exponent per matrix of x (..., p, q) or row of σ (..., k): four exact steps, so
    that 2^exponent itself never overflows."""
    e = exponent.to(torch.float64)
    part = torch.trunc(e / 4)
    for step in (part, part, part, e - 3 * part):  # each |step| < 900: 2^step is a normal float64
        x = x * torch.exp2(step).to(x.dtype).reshape(*step.shape, *([1] * (x.ndim - step.ndim)))
    return x


def unit_scaled(x: Tensor) -> tuple[Tensor, Tensor]:
    """(x · 2^-e, e) per matrix of x (..., p, q) float64, with e the exponent of max |x| (0 for a zero matrix)."""
    _, e = torch.frexp(x.abs().amax(dim=(-2, -1)))
    return times_pow2(x, -e), e


def _sigma_qr(a: Tensor, b: Tensor, dense: bool) -> tuple[Tensor, Tensor]:
    """σ of the unit-scaled B·A per batch entry, float64, and the exponent to scale it back by."""
    a, ea = unit_scaled(a.to(torch.float64))
    b, eb = unit_scaled(b.to(torch.float64))
    k = min(a.shape[-2], a.shape[-1], b.shape[-2])
    if dense:
        sigma = torch.linalg.svdvals(b @ a)[..., :k]
    else:
        r_b = torch.linalg.qr(b, mode="r").R
        r_a = torch.linalg.qr(a.mT, mode="r").R
        sigma = torch.linalg.svdvals(r_b @ r_a.mT)
    return sigma, ea + eb


def _scaled_back(sigma: Tensor, exponent: Tensor, scaling: Tensor) -> Tensor:
    """σ · |s| · 2^exponent with one rounding: |s| = f·2^es, f in [0.5, 1)."""
    f, es = torch.frexp(scaling.abs())
    return times_pow2(sigma * f.unsqueeze(-1), exponent + es)


def lowrank_svdvals_ref(a_list: Sequence[Tensor], b_list: Sequence[Tensor], scaling: Sequence[float]) -> list[Tensor]:
    """Reference for ``lowrank_svdvals``, one adapter entry at a time; same arguments and results.

    Raises:
        ValueError: an entry holds NaN or Inf.
    """
    out = []
    for i, (a, b, s) in enumerate(zip(a_list, b_list, scaling, strict=True)):
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
            raise ValueError(f"lowrank_svdvals: adapter {i} contains NaN or Inf")
        sigma, exponent = _sigma_qr(a, b, dense=False)
        s = torch.full(exponent.shape, float(s), dtype=torch.float64, device=a.device)
        out.append(_scaled_back(sigma, exponent, s).to(result_dtype(a.dtype)))
    return out


# ---------------------------------------------------------------------------------------------------------------
# The op


def _non_finite(index: int, batch_index: int | None) -> ValueError:
    where = "" if batch_index is None else f" (batch index {batch_index})"
    return ValueError(f"lowrank_svdvals: adapter {index}{where} contains NaN or Inf")


def _native_route(native: list[tuple[int, bool, bool]], entries: list[tuple], out: list) -> None:
    """σ of the adapters ``native`` ((index, batched, float64) each; ``entries`` as ``_native.lowrank_svdvals``
    takes them) from one call into the native library."""
    sizes = [entry[3] * entry[4] for entry in entries]  # batch · r
    flat = torch.empty(sum(sizes), dtype=torch.float64)
    bad = _native.lowrank_svdvals(entries, flat, torch.get_num_threads())
    if bad is not None:
        i, batched, _ = native[bad[0]]
        raise _non_finite(i, bad[1] if batched else None)
    # one split into views per result dtype (a slice per entry costs ~1.5 µs more)
    pieces: dict[bool, tuple[Tensor, ...]] = {}
    for k, (i, batched, is_float64) in enumerate(native):
        if is_float64 not in pieces:
            pieces[is_float64] = (flat if is_float64 else flat.to(torch.float32)).split(sizes)
        piece = pieces[is_float64][k]
        out[i] = piece.view(-1, entries[k][4]) if batched else piece


def _torch_route(entries: list[int], a_list, b_list, scaling, out: list) -> None:
    """The entries' σ by torch ops, one batched call per (device, dtype, shape, route) group."""
    groups: dict[tuple, list[int]] = {}
    for i in entries:
        a, b = a_list[i], b_list[i]
        r, n, m = a.shape[-2], a.shape[-1], b.shape[-2]
        groups.setdefault((a.device, a.dtype, r, m, n, prefers_dense_route(r, m, n)), []).append(i)
    stacked = []
    finite = []
    for key, members in groups.items():
        a = torch.cat([a_list[i].reshape(-1, *a_list[i].shape[-2:]) for i in members])
        b = torch.cat([b_list[i].reshape(-1, *b_list[i].shape[-2:]) for i in members])
        stacked.append((key, members, a, b))
        finite.append(torch.isfinite(a).all() & torch.isfinite(b).all())
    # one host sync per device for the whole call; only on failure is the culprit looked for
    by_device: dict[torch.device, list[Tensor]] = {}
    for flag in finite:
        by_device.setdefault(flag.device, []).append(flag)
    if not all(bool(torch.stack(flags).all()) for flags in by_device.values()):
        for i in entries:
            if not (bool(torch.isfinite(a_list[i]).all()) and bool(torch.isfinite(b_list[i]).all())):
                raise _non_finite(i, None)
    for (device, dtype, _, _, _, dense), members, a, b in stacked:
        counts = [a_list[i].shape[0] if a_list[i].ndim == 3 else 1 for i in members]
        scales = torch.tensor(
            [scaling[i] for i, c in zip(members, counts, strict=True) for _ in range(c)], dtype=torch.float64
        ).to(device)
        sigma, exponent = _sigma_qr(a, b, dense)
        sigma = _scaled_back(sigma, exponent, scales).to(result_dtype(dtype))
        for i, chunk in zip(members, sigma.split(counts), strict=True):
            out[i] = chunk if a_list[i].ndim == 3 else chunk[0]


_size = Tensor.size
_data_ptr = Tensor.data_ptr
_is_contiguous = Tensor.is_contiguous
_dtype_of = operator.attrgetter("dtype")
_is_cpu = operator.attrgetter("is_cpu")


def _separate_native(a_list: Sequence[Any], b_list: Sequence[Any], scaling: Sequence[float]) -> list[Tensor] | None:
    """The usual call, fast: separate 2-D contiguous CPU tensors of one dtype the kernel reads, all on the low-rank
    route, with the native backend. Each attribute is read for all adapters at once (one attribute read costs
    ~0.05-0.2 µs, and the per-adapter loop of the general path ~3.5 µs per adapter, as much as the kernel at r = 8);
    adapters of one shape become one entry with a pointer each, and one output buffer is split into the results.
    None when the call is anything else: the general path then checks, converts and routes.
    """
    count = len(a_list)
    tensors = repeat(Tensor, count)
    if not (all(map(isinstance, a_list, tensors)) and all(map(isinstance, b_list, repeat(Tensor, count)))):
        return None
    dtypes = set(map(_dtype_of, a_list))
    dtypes.update(map(_dtype_of, b_list))
    dtype = dtypes.pop()
    if dtypes or dtype not in _KERNEL_DTYPES:
        return None
    if not (all(map(_is_cpu, a_list)) and all(map(_is_cpu, b_list))):
        return None
    if not (all(map(_is_contiguous, a_list)) and all(map(_is_contiguous, b_list))):
        return None
    sizes_a, sizes_b = list(map(_size, a_list)), list(map(_size, b_list))
    groups: dict[tuple[torch.Size, torch.Size], list[int] | None]
    if sizes_a.count(sizes_a[0]) == count and sizes_b.count(sizes_b[0]) == count:
        groups = {(sizes_a[0], sizes_b[0]): None}  # None: every adapter, in input order
    else:
        groups = {}
        for i, key in enumerate(zip(sizes_a, sizes_b, strict=True)):
            groups.setdefault(key, []).append(i)  # type: ignore[union-attr]
    for size_a, size_b in groups:
        if len(size_a) != 2 or len(size_b) != 2:
            return None
        (r, n), (m, r_b) = size_a, size_b
        if r != r_b or r * n * m == 0 or (r * 8 > min(m, n) and prefers_dense_route(r, m, n)):
            return None
    if select_backend("cpu", implemented=("ref", "cpp")) != "cpp":
        return None

    one_scaling = scaling.count(scaling[0]) == count
    params = _NATIVE_PARAMS[dtype]
    entries, sizes = [], []
    for ((r, n), (m, _)), members in groups.items():
        if members is None:
            a_sel, b_sel, s_sel = a_list, b_list, scaling
        else:
            a_sel, b_sel = [a_list[i] for i in members], [b_list[i] for i in members]
            s_sel = [scaling[i] for i in members]
        batch = len(a_sel)
        ptr_a, ptr_b = array("q", map(_data_ptr, a_sel)), array("q", map(_data_ptr, b_sel))
        scale = scaling[0] if one_scaling else array("d", s_sel)
        entries.append((ptr_a, ptr_b, dtype, batch, r, m, n, (0, n), (0, r), scale, *params))
        sizes.extend(repeat(r, batch))
    flat = torch.empty(sum(sizes), dtype=torch.float64)
    bad = _native.lowrank_svdvals(entries, flat, torch.get_num_threads())
    members_of = list(groups.values())
    if bad is not None:
        members = members_of[bad[0]]
        raise _non_finite(bad[1] if members is None else members[bad[1]], None)
    if dtype != torch.float64:
        flat = flat.to(torch.float32)
    pieces = flat.split(sizes)
    if members_of[0] is None:
        return list(pieces)
    out: list[Tensor] = [None] * count  # type: ignore[list-item]
    for i, piece in zip((i for members in members_of for i in members), pieces, strict=True):  # type: ignore[union-attr]
        out[i] = piece
    return out


def svdvals(
    a_list: Sequence[Tensor], b_list: Sequence[Tensor], scaling: Sequence[float], where: str = "lowrank_svdvals"
) -> list[Tensor]:
    """The op's implementation (eager): σ of ``|scaling[e]| · B[e] @ A[e]`` for every entry e.

    Args:
        a_list: A per entry, (..., r, n).
        b_list: B per entry, (..., m, r) with A's leading dims.
        scaling: one finite float per entry (``check_scalings``).
        where: how error messages name the caller.

    Returns:
        Per entry (..., k) with k = min(r, m, n), descending, float64 for float64 input, else float32.

    Raises:
        ValueError: a bad adapter (as ``check_pair`` says), or one that holds NaN or Inf (named by its entry and
            batch index).
        RuntimeError: ``LORA_FAST_BACKEND`` names a backend that cannot run these tensors.
    """
    if not len(a_list) == len(b_list) == len(scaling):
        raise ValueError(f"{where}: {len(a_list)} A, {len(b_list)} B and {len(scaling)} scalings")
    if a_list:
        fast = _separate_native(a_list, b_list, scaling)
        if fast is not None:
            return fast
    a_list, b_list = list(a_list), list(b_list)
    out: list[Tensor | None] = [None] * len(a_list)
    lead: dict[int, torch.Size] = {}  # entries with more than one batch dim, flattened for the kernels
    native: list[tuple[int, bool, bool]] = []
    native_entries: list[tuple] = []
    other: list[int] = []
    cpu_backend = None
    for i, (a, b) in enumerate(zip(a_list, b_list, strict=True)):
        # Fast path for the usual adapter (2-D, one dtype the kernels read, on the CPU); anything else goes through
        # check_pair, which names the problem or converts. Reading a size or stride costs ~0.1-0.2 µs, and a model
        # has hundreds of adapters, so each is read once.
        usual = isinstance(a, Tensor) and isinstance(b, Tensor) and a.ndim == 2 == b.ndim
        if usual:
            (r, n), (m, r_b) = a.shape, b.shape
            dtype = a.dtype
            usual = (
                r == r_b and r * n * m > 0 and dtype == b.dtype and dtype in _KERNEL_DTYPES and a.is_cpu and b.is_cpu
            )
        if usual:
            batch = 1
        else:
            a, b = check_pair(a, b, f"{where}: adapter {i}")
            if a.ndim > 3:
                lead[i] = a.shape[:-2]
                a, b = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
            a_list[i], b_list[i] = a, b
            r, n, m, dtype = a.shape[-2], a.shape[-1], b.shape[-2], a.dtype
            batch = a.shape[0] if a.ndim == 3 else 1
        if r * 8 > min(m, n) and prefers_dense_route(r, m, n):  # r <= min(m, n) / 8 is always low-rank
            other.append(i)
            continue
        if not a.is_cpu:
            select_backend(a.device, implemented=("ref", "cpp"))  # raises if a forced backend cannot run here
            other.append(i)
            continue
        if cpu_backend is None:
            cpu_backend = select_backend("cpu", implemented=("ref", "cpp"))
        if cpu_backend != "cpp":
            other.append(i)
            continue
        # the kernel reads rows with a stride, but each row must be contiguous
        stride_a, stride_b = a.stride(), b.stride()
        if stride_a[-1] != 1 or (r > 1 and stride_a[-2] < n):
            a = a.contiguous()
            stride_a = a.stride()
        if stride_b[-1] != 1 or stride_b[-2] < r:
            b = b.contiguous()
            stride_b = b.stride()
        if a.ndim == 3:
            (batch_a, row_a), (batch_b, row_b) = stride_a[:2], stride_b[:2]
        else:
            batch_a, batch_b, row_a, row_b = 0, 0, stride_a[0], stride_b[0]
        if r == 1:
            row_a = n  # a size-1 dimension may carry any stride
        native.append((i, a.ndim == 3, dtype == torch.float64))
        native_entries.append(
            (a, b, dtype, batch, r, m, n, (batch_a, row_a), (batch_b, row_b), scaling[i], *_NATIVE_PARAMS[dtype])
        )
    if native:
        _native_route(native, native_entries, out)
    if other:
        _torch_route(other, a_list, b_list, scaling, out)
    for i, dims in lead.items():
        out[i] = out[i].reshape(*dims, -1)
    return out  # type: ignore[return-value]


@torch.library.custom_op("lora_fast::lowrank_svdvals", mutates_args=())
def lowrank_svdvals(a_list: list[Tensor], b_list: list[Tensor], scaling: list[float]) -> list[Tensor]:
    """σ of ``|scaling[e]| · B[e] @ A[e]`` per entry; A (batch, r, n), B (batch, m, r) or both 2-D.

    Returns one (batch, k) tensor per entry ((k,) for 2-D entries), k = min(r, m, n), descending, float64 for
    float64 input and float32 otherwise. Not differentiable: it is an analysis op. Eager callers with many entries
    call ``svdvals`` directly: this wrapper costs ~8 µs per tensor in the lists.
    """
    return [s.clone() for s in svdvals(a_list, b_list, scaling)]  # outputs of a custom op may not share storage


@lowrank_svdvals.register_fake
def _(a_list: list[Tensor], b_list: list[Tensor], scaling: list[float]) -> list[Tensor]:
    return [
        a.new_empty((*a.shape[:-2], min(a.shape[-2], a.shape[-1], b.shape[-2])), dtype=result_dtype(a.dtype))
        for a, b in zip(a_list, b_list, strict=True)
    ]
