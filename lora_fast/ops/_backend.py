"""Backend selection for lora_fast ops.

``auto`` picks Triton for CUDA tensors (when Triton imports), the C++ extension ``lora_fast._C`` for CPU
tensors (when it loaded), and the plain-PyTorch reference otherwise. ``LORA_FAST_BACKEND=ref|cpp|triton``
forces one backend; a forced backend that cannot be loaded raises instead of silently falling back.
An op that has no implementation for the forced backend runs its reference path (documented per op).
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from types import ModuleType

import torch

BACKENDS = ("ref", "cpp", "triton")
_ENV = "LORA_FAST_BACKEND"


@functools.cache
def _load_cpp() -> tuple[ModuleType | None, str]:
    try:
        module = importlib.import_module("lora_fast._C")
    except Exception as exc:  # any load failure (missing .so, ABI mismatch) must not break the package
        return None, f"{type(exc).__name__}: {exc}"
    built = getattr(module, "torch_version", "")
    if built and built.split("+")[0] != torch.__version__.split("+")[0]:
        return None, f"lora_fast._C was built against torch {built} but torch {torch.__version__} is running"
    return module, ""


@functools.cache
def _load_triton() -> tuple[ModuleType | None, str]:
    try:
        module = importlib.import_module("triton")
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return module, ""


@functools.cache
def _warn_cpp_missing_once(reason: str) -> None:
    warnings.warn(
        f"lora_fast: the C++ extension is not available ({reason}); using the PyTorch reference path. "
        "Reinstall with `pip install --no-build-isolation .` to build it against the running torch.",
        RuntimeWarning,
        stacklevel=3,
    )


def cpp_module() -> ModuleType | None:
    """The loaded ``lora_fast._C`` module, or None (with a one-time warning) when it failed to load."""
    module, reason = _load_cpp()
    if module is None:
        _warn_cpp_missing_once(reason)
    return module


def has_cpp() -> bool:
    return _load_cpp()[0] is not None


def has_triton() -> bool:
    return _load_triton()[0] is not None


def available_backends() -> list[str]:
    """Backends that can run in this process, in preference order of nothing in particular."""
    return ["ref"] + (["cpp"] if has_cpp() else []) + (["triton"] if has_triton() else [])


def forced_backend() -> str | None:
    """The backend named by ``LORA_FAST_BACKEND``, validated and loaded, or None for ``auto``."""
    name = os.environ.get(_ENV, "auto").strip().lower()
    if name in ("", "auto"):
        return None
    if name not in BACKENDS:
        raise ValueError(f"{_ENV}={name!r} is not one of {', '.join(BACKENDS)} or auto")
    if name == "cpp" and not has_cpp():
        raise RuntimeError(f"{_ENV}=cpp but lora_fast._C is unavailable: {_load_cpp()[1]}")
    if name == "triton" and not has_triton():
        raise RuntimeError(f"{_ENV}=triton but triton is unavailable: {_load_triton()[1]}")
    return name


def select_backend(device: torch.device | str, implemented: tuple[str, ...]) -> str:
    """Pick the backend for an op that has the ``implemented`` backends, for tensors on ``device``.

    Args:
        device: where the op's inputs live.
        implemented: the backends this op has (always includes ``"ref"``).
    """
    device = torch.device(device)
    forced = forced_backend()
    if forced is not None:
        return forced if forced in implemented else "ref"
    if device.type == "cuda" and "triton" in implemented and has_triton():
        return "triton"
    if device.type == "cpu" and "cpp" in implemented:
        return "cpp" if cpp_module() is not None else "ref"
    return "ref"
