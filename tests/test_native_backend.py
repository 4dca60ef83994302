"""lora_fast.ops._backend: auto choice and forced backends, which must respect the inputs' device."""

from __future__ import annotations

import pytest
import torch

from lora_fast.energy_rank import singular_values
from lora_fast.ops import _backend


def test_auto_choice(monkeypatch, native):
    monkeypatch.delenv("LORA_FAST_BACKEND", raising=False)
    assert _backend.select_backend("cpu", ("ref", "cpp")) == "cpp"
    assert _backend.select_backend("cpu", ("ref",)) == "ref"
    assert _backend.select_backend("cuda", ("ref", "cpp")) == "ref"  # no CUDA kernel in the native library
    assert _backend.available_backends()[:2] == ["ref", "cpp"]


def test_forced_native_backend_runs_cpu_tensors_only(monkeypatch, native):
    monkeypatch.setenv("LORA_FAST_BACKEND", "cpp")
    assert _backend.select_backend("cpu", ("ref", "cpp")) == "cpp"
    with pytest.raises(RuntimeError, match="runs CPU tensors only; the inputs are on cuda"):
        _backend.select_backend("cuda", ("ref", "cpp"))
    with pytest.raises(RuntimeError, match="CPU tensors only"):
        singular_values(torch.randn(4, 30, device="meta"), torch.randn(20, 4, device="meta"))
    assert _backend.select_backend("cuda", ("ref", "triton")) == "ref"  # an op without a native kernel: reference


def test_forced_triton_needs_its_interpreter_on_cpu(monkeypatch):
    if not _backend.has_triton():
        pytest.skip(f"triton is not installed: {_backend._load_triton()[1]}")
    monkeypatch.setenv("LORA_FAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.select_backend("cpu", ("ref", "triton")) == "triton"
    assert _backend.select_backend("cuda", ("ref", "triton")) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _backend.select_backend("cpu", ("ref", "triton"))
    assert _backend.select_backend("cpu", ("ref", "cpp")) == "ref"  # the spectral op has no Triton kernel


def test_forced_reference_and_bad_names(monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", "ref")
    assert _backend.select_backend("cpu", ("ref", "cpp")) == "ref"
    assert _backend.select_backend("cuda", ("ref", "triton")) == "ref"
    monkeypatch.setenv("LORA_FAST_BACKEND", "cuda")
    with pytest.raises(ValueError, match="is not one of ref, cpp, triton or auto"):
        _backend.select_backend("cpu", ("ref",))
    monkeypatch.setenv("LORA_FAST_BACKEND", " Auto ")
    assert _backend.forced_backend() is None
