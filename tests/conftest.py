import os

# Triton kernels run on CPU only through the interpreter, and it must be on before any @triton.jit is defined.
os.environ.setdefault("TRITON_INTERPRET", "1")
# With other load on the 2 cores, spinning OpenMP threads made a LoRA step 8x slower (1.88 s vs 0.23 s passive).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from lora_fast.ops import _backend

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(params=["ref", "cpp"])
def backend(request, monkeypatch):
    """Runs a test once per CPU backend of the spectral op; cpp is skipped when the extension did not load."""
    if request.param == "cpp" and not _backend.has_cpp():
        pytest.skip(f"lora_fast._C unavailable: {_backend._load_cpp()[1]}")
    monkeypatch.setenv("LORA_FAST_BACKEND", request.param)
    return request.param
