"""Loads lora_fast's native library with ctypes and hands it tensors' data pointers.

The library (``csrc/``, built by ``pip install .`` into this package's folder) is plain C++ behind a C ABI: it
includes no torch header and links no torch library, so the same build runs under any torch, and the wheel is tagged
``py3-none`` (one wheel for every Python). Callers allocate outputs with torch and pass pointers, as bitsandbytes does.

A missing library (a source checkout, or a platform the build skipped) or a broken one is reported once, with the
reason, and the ops use their PyTorch reference. ``LORA_FAST_NATIVE_LIB=/path/to/lib`` loads another build.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from array import array
from pathlib import Path

import torch

LIBRARY_ENV = "LORA_FAST_NATIVE_LIB"
# Must match csrc/lowrank_svd.h.
ABI_VERSION = 3
FIELDS = (
    "a_ptr",
    "b_ptr",
    "dtype",
    "batch",
    "r",
    "m",
    "n",
    "a_batch_stride",
    "a_row_stride",
    "b_batch_stride",
    "b_row_stride",
    "out_offset",
    "indirect",
    "scale_ptr",
)
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
_OK, _NON_FINITE, _BAD_ARGUMENT, _OUT_OF_MEMORY = 0, 1, 2, 3

_PACKAGE_DIR = Path(__file__).resolve().parent.parent
_NAMES = {"win32": "liblora_fast_native.dll", "darwin": "liblora_fast_native.dylib"}
LIBRARY_NAME = _NAMES.get(sys.platform, "liblora_fast_native.so")


def installed_library() -> Path | None:
    """The library file that ``pip install .`` put into the package, or None when there is none."""
    path = _PACKAGE_DIR / LIBRARY_NAME
    return path if path.is_file() else None


@functools.cache
def load() -> tuple[ctypes.CDLL | None, str]:
    """(library, "") once loaded, or (None, why not). Loads at most once per process."""
    override = os.environ.get(LIBRARY_ENV)
    path = Path(override) if override else installed_library()
    if path is None:
        return None, (
            f"{LIBRARY_NAME} is not in {_PACKAGE_DIR} (a source checkout, or the build skipped it); "
            "install the package with `pip install .`"
        )
    try:
        lib = ctypes.CDLL(str(path))
        version = lib.lf_abi_version()
    except (OSError, AttributeError) as exc:
        return None, f"{path} could not be loaded: {exc}"
    if version != ABI_VERSION:
        return None, f"{path} has ABI version {version}, this package needs {ABI_VERSION}: reinstall lora_fast"
    lib.lf_isa.restype = ctypes.c_char_p
    lib.lf_select_isa.restype = ctypes.c_char_p
    lib.lf_select_isa.argtypes = [ctypes.c_char_p]
    lib.lf_lowrank_svdvals.restype = ctypes.c_int32
    lib.lf_lowrank_svdvals.argtypes = [
        ctypes.c_int64,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int32,
        ctypes.c_void_p,
    ]
    return lib, ""


def available() -> bool:
    return load()[0] is not None


def _lib() -> ctypes.CDLL:
    lib, reason = load()
    if lib is None:
        raise RuntimeError(f"lora_fast's native library is unavailable: {reason}")
    return lib


def isa() -> str:
    """Instruction set the native kernels run with here: ``x86-64-v4`` (AVX-512), ``x86-64-v3`` or ``baseline``."""
    return _lib().lf_isa().decode()


def select_isa(cap: str | None) -> str:
    """Use the best kernels up to ``cap`` (None: the best this CPU runs); returns the one chosen. For tests."""
    return _lib().lf_select_isa(None if cap is None else cap.encode()).decode()


def lowrank_svdvals(entries: list[tuple], out: torch.Tensor, num_threads: int) -> tuple[int, int] | None:
    """σ of ``|s|·B @ A`` for each entry into ``out`` (float64, contiguous), entry after entry, batch·r values each.

    Args:
        entries: ``(A, B, dtype, batch, r, m, n, A's (batch, row) strides, B's (batch, row) strides, s, max Cholesky
            ratio, σ accuracy needed relative to σ_max)``. A and B: CPU tensors of ``dtype`` (float32, float64,
            bfloat16 or float16) with contiguous rows, holding ``batch`` adapters at the batch strides; or two
            ``array("q")`` of ``batch`` data addresses each, one per adapter (separate tensors of one shape and
            row strides; the batch strides are unused). s: one float, or an ``array("d")`` of ``batch`` values.
            r <= min(m, n); sizes and strides in elements (the caller has read them already: reading them again
            costs ~1 µs per adapter). The caller keeps the tensors alive during the call.
        out: receives the values, in entry order.
        num_threads: threads the library may use, the caller's included.

    Returns:
        None, or (entry, batch index) of the first adapter that holds NaN or Inf (``out`` is then incomplete).
    """
    lib = _lib()
    fields: array = array("q")
    params: array = array("d")
    offset = 0
    for a, b, dtype, batch, r, m, n, (a_batch, a_row), (b_batch, b_row), scaling, max_ratio, sigma_tol in entries:
        indirect = isinstance(a, array)
        if indirect != isinstance(b, array) or (indirect and not len(a) == len(b) == batch):
            raise ValueError("lowrank_svdvals: A and B must both be tensors or both arrays of batch addresses")
        addresses = (a.buffer_info()[0], b.buffer_info()[0]) if indirect else (a.data_ptr(), b.data_ptr())
        per_adapter = isinstance(scaling, array)
        if per_adapter and len(scaling) != batch:
            raise ValueError(f"lowrank_svdvals: {len(scaling)} scalings for a batch of {batch}")
        fields.extend(
            (
                *addresses,
                DTYPE_CODES[dtype],
                batch,
                r,
                m,
                n,
                a_batch,
                a_row,
                b_batch,
                b_row,
                offset,
                int(indirect),
                scaling.buffer_info()[0] if per_adapter else 0,
            )
        )
        params.extend((0.0 if per_adapter else scaling, max_ratio, sigma_tol))
        offset += batch * r
    if out.dtype != torch.float64 or not out.is_contiguous() or out.numel() < offset:
        raise ValueError(f"lowrank_svdvals: out must be a contiguous float64 tensor of at least {offset} values")
    bad = (ctypes.c_int64 * 2)()
    status = lib.lf_lowrank_svdvals(
        len(entries), fields.buffer_info()[0], params.buffer_info()[0], out.data_ptr(), num_threads, bad
    )
    if status == _NON_FINITE:
        return bad[0], bad[1]
    if status == _BAD_ARGUMENT:
        raise ValueError(f"lowrank_svdvals: native library refused entry {bad[0]}, field {FIELDS[bad[1]]}")
    if status == _OUT_OF_MEMORY:
        raise MemoryError("lowrank_svdvals: the native library ran out of memory")
    if status != _OK:
        raise RuntimeError(f"lowrank_svdvals: native library returned status {status}")
    return None
