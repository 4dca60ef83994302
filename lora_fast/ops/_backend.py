"""Backend selection for lora_fast ops: the one dispatch point.

``auto`` picks Triton for CUDA tensors (when Triton imports), the native library (``cpp``, see ``_native.py``) for
CPU tensors (when it loaded), and the plain-PyTorch reference otherwise. ``LORA_FAST_BACKEND=ref|cpp|triton`` forces
one backend: it raises when that backend cannot be loaded, or cannot run on the inputs' device (``cpp`` runs CPU
tensors only; ``triton`` runs CUDA tensors, and CPU tensors only under its interpreter, ``TRITON_INTERPRET=1``).
An op that has no implementation for the forced backend runs its reference path (documented per op).
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from types import ModuleType

import torch

from lora_fast.ops import _native

BACKENDS = ("ref", "cpp", "triton")
_ENV = "LORA_FAST_BACKEND"


@functools.cache
def _load_triton() -> tuple[ModuleType | None, str]:
    try:
        module = importlib.import_module("triton")
    except Exception as exc:  # any import failure (missing, broken install) must not break the package
        return None, f"{type(exc).__name__}: {exc}"
    return module, ""


@functools.cache
def _warn_native_missing_once(reason: str) -> None:
    warnings.warn(
        f"lora_fast: the native library is not available ({reason}); using the PyTorch reference path.",
        RuntimeWarning,
        stacklevel=4,
    )


def native_reason() -> str:
    """Why the native library did not load ("" when it did)."""
    return _native.load()[1]


def has_cpp() -> bool:
    """True when the native library (backend ``cpp``) loaded."""
    return _native.available()


def has_triton() -> bool:
    return _load_triton()[0] is not None


def available_backends() -> list[str]:
    """Backends that can run in this process."""
    return ["ref"] + (["cpp"] if has_cpp() else []) + (["triton"] if has_triton() else [])


def forced_backend() -> str | None:
    """The backend named by ``LORA_FAST_BACKEND``, validated and loaded, or None for ``auto``."""
    name = os.environ.get(_ENV, "auto").strip().lower()
    if name in ("", "auto"):
        return None
    if name not in BACKENDS:
        raise ValueError(f"{_ENV}={name!r} is not one of {', '.join(BACKENDS)} or auto")
    if name == "cpp" and not has_cpp():
        raise RuntimeError(f"{_ENV}=cpp but lora_fast's native library is unavailable: {native_reason()}")
    if name == "triton" and not has_triton():
        raise RuntimeError(f"{_ENV}=triton but triton is unavailable: {_load_triton()[1]}")
    return name


def _check_device(backend: str, device: torch.device) -> None:
    if backend == "cpp" and device.type != "cpu":
        raise RuntimeError(f"{_ENV}=cpp runs CPU tensors only; the inputs are on {device}")
    if backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"{_ENV}=triton on CPU tensors needs Triton's interpreter (TRITON_INTERPRET=1)")
    if backend == "triton" and device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"{_ENV}=triton runs CUDA tensors; the inputs are on {device}")


def select_backend(device: torch.device | str, implemented: tuple[str, ...]) -> str:
    """Pick the backend for an op that has the ``implemented`` backends, for tensors on ``device``.

    Args:
        device: where the op's inputs live.
        implemented: the backends this op has (always includes ``"ref"``).

    Raises:
        RuntimeError: the forced backend is unavailable or cannot run on ``device``.
    """
    device = torch.device(device)
    forced = forced_backend()
    if forced is not None:
        if forced not in implemented:
            return "ref"
        _check_device(forced, device)
        return forced
    if device.type == "cuda" and "triton" in implemented and has_triton():
        return "triton"
    if device.type == "cpu" and "cpp" in implemented:
        if has_cpp():
            return "cpp"
        _warn_native_missing_once(native_reason())
    return "ref"
