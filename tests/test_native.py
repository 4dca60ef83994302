"""The native library (csrc/, loaded by lora_fast.ops._native) against a float64 dense SVD, per instruction set.

These tests fail rather than skip when the installed package holds the library or CI is set (see conftest).
"""

from __future__ import annotations

import math
import os
import struct
import subprocess
import sys
import textwrap

import pytest
import torch

from lora_fast.ops import lowrank_svd as op

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
ISAS = ["x86-64-v4", "x86-64-v3", "baseline"]


@pytest.fixture(params=ISAS)
def isa(request, native):
    """Runs a test with each kernel variant this CPU can run; an unsupported one falls back and is skipped."""
    chosen = native.select_isa(request.param)
    yield chosen
    native.select_isa(None)
    if chosen != request.param:
        pytest.skip(f"this CPU runs {chosen}, not {request.param}")


def dense_sigma(a: torch.Tensor, b: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    k = min(a.shape[-2], a.shape[-1], b.shape[-2])
    return torch.linalg.svdvals(b.double() @ a.double())[..., :k] * abs(scaling)


def native_entry(a: torch.Tensor, b: torch.Tensor, scaling: float = 1.0) -> tuple:
    """The entry `_native.lowrank_svdvals` takes for A (batch, r, n) or (r, n) and B (batch, m, r) or (m, r)."""
    batch, strides_a, strides_b = (
        (a.shape[0], a.stride()[:2], b.stride()[:2]) if a.ndim == 3 else (1, (0, a.stride(0)), (0, b.stride(0)))
    )
    r, n, m = a.shape[-2], a.shape[-1], b.shape[-2]
    dtype = a.dtype
    return (
        a,
        b,
        dtype,
        batch,
        r,
        m,
        n,
        strides_a,
        strides_b,
        scaling,
        op.MAX_CHOLESKY_RATIO[dtype],
        op.SIGMA_TOLERANCE[dtype],
    )


def native_sigma(native, a: torch.Tensor, b: torch.Tensor, scaling: float = 1.0, threads: int = 2) -> torch.Tensor:
    out = torch.full((a.shape[-2] * (a.shape[0] if a.ndim == 3 else 1),), float("nan"), dtype=torch.float64)
    assert native.lowrank_svdvals([native_entry(a, b, scaling)], out, threads) is None
    return out.view(a.shape[0], -1) if a.ndim == 3 else out


def assert_close(sigma: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    scale = ref.abs().amax().clamp_min(1e-300)
    err = ((sigma - ref).abs() / scale).max().item()
    assert err <= TOL[dtype], f"max sigma error {err:.3e} of sigma_max exceeds {TOL[dtype]:.0e}"


def adapter(m, n, r, dtype, kind="random", seed=0):
    """A (r, n), B (m, r) of a kind that stresses one part of the algorithm."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    a = torch.randn(r, n, generator=g, dtype=f64) / math.sqrt(n)
    b = torch.randn(m, r, generator=g, dtype=f64)
    if kind == "ill_conditioned":  # B's singular values 1 .. 1e-9: Cholesky-QR alone would lose the small ones
        q1, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=f64))
        q2, _ = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=f64))
        b = q1 @ torch.diag(torch.logspace(0, -9, r, dtype=f64)) @ q2
    elif kind == "rank_deficient":  # rank 3 < r: a zero pivot in B's Cholesky
        b = torch.randn(m, 3, generator=g, dtype=f64) @ torch.randn(3, r, generator=g, dtype=f64)
    elif kind == "zero_column":
        b[:, r // 2] = 0
    elif kind == "misaligned":  # B's strong columns meet A's weak rows: BA far smaller than |B||A|
        d = torch.logspace(-3, 3, r, dtype=f64)
        b, a = b * d, a / d.unsqueeze(-1)
    return a.to(dtype), b.to(dtype)


KINDS = ["random", "ill_conditioned", "rank_deficient", "zero_column", "misaligned"]


SHAPES = [(123, 431, 7), (431, 123, 1), (200, 256, 64), (64, 37, 33), (9, 300, 8)]
CASES = [(*shape, kind) for shape in SHAPES for kind in KINDS if shape[2] >= 4 or kind in ("random", "misaligned")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m,n,r,kind", CASES)
def test_matches_dense_svd(isa, native, m, n, r, kind, dtype):
    a, b = adapter(m, n, r, dtype, kind, seed=m + n + r)
    assert_close(native_sigma(native, a, b, -0.5), dense_sigma(a, b, 0.5), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_read_directly(isa, native, dtype):
    a, b = adapter(150, 97, 12, dtype)
    assert a.dtype == dtype  # no conversion on the Python side: the kernel widens each value exactly
    assert_close(native_sigma(native, a, b), dense_sigma(a, b), dtype)


@pytest.mark.parametrize("magnitude", [1e-300, 1e-200, 1e-160, 1e160, 1e200, 1e300])
def test_extreme_magnitudes(isa, native, magnitude):
    a, b = adapter(80, 90, 5, torch.float64)
    sigma = native_sigma(native, a * magnitude, b)
    ref = dense_sigma(a, b) * magnitude
    assert ((sigma - ref).abs().max() / ref.max()).item() < 1e-10


def test_overflowing_product_gives_inf_not_nan(native):
    a, b = adapter(30, 40, 5, torch.float64)
    assert torch.isinf(native_sigma(native, a * 1e160, b * 1e160)).all()
    # σ = 4, 2, 1, 0.5, 0.25 times 1e308: the first two overflow, the others are representable
    a = torch.eye(5, 40, dtype=torch.float64)
    b = torch.eye(30, 5, dtype=torch.float64) * torch.tensor([4.0, 2.0, 1.0, 0.5, 0.25], dtype=torch.float64)
    sigma = native_sigma(native, a, b, scaling=1e308)
    assert torch.isinf(sigma[:2]).all()
    assert torch.equal(sigma[2:], torch.tensor([1e308, 0.5e308, 0.25e308], dtype=torch.float64))


def test_zero_factors_and_scaling(native):
    a, b = adapter(60, 50, 6, torch.float32)
    assert torch.equal(native_sigma(native, a, torch.zeros_like(b)), torch.zeros(6, dtype=torch.float64))
    assert torch.equal(native_sigma(native, torch.zeros_like(a), b), torch.zeros(6, dtype=torch.float64))
    assert torch.equal(native_sigma(native, a, b, scaling=0.0), torch.zeros(6, dtype=torch.float64))
    tiny = native_sigma(native, a.double() * 1e-310, b.double())  # subnormal A: not a zero factor
    assert (tiny > 0).all()


def test_batches_strides_and_threads(native):
    big_a = torch.randn(5, 12, 140)
    big_b = torch.randn(5, 100, 20)
    a, b = big_a[:, :9, :130], big_b[:, :, 3:12]  # row strides 140 and 20, batch strides 1680 and 2000
    ref = dense_sigma(a, b, 3.0)
    for threads in (1, 2, 7):
        assert_close(native_sigma(native, a, b, 3.0, threads), ref, torch.float32)


def test_many_entries_one_call(native):
    shapes = [(123, 431, 7), (431, 123, 1), (300, 400, 16), (64, 65, 33), (77, 88, 8)] * 3
    pairs = [adapter(m, n, r, torch.float64, seed=i) for i, (m, n, r) in enumerate(shapes)]
    entries = [native_entry(a, b, float(i + 1)) for i, (a, b) in enumerate(pairs)]
    out = torch.empty(sum(a.shape[0] for a, _ in pairs), dtype=torch.float64)
    assert native.lowrank_svdvals(entries, out, 2) is None
    for i, ((a, b), sigma) in enumerate(zip(pairs, out.split([a.shape[0] for a, _ in pairs]), strict=True)):
        assert_close(sigma, dense_sigma(a, b, i + 1), torch.float64)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_non_finite_reported_with_entry_and_batch_index(native, bad, dtype):
    a = torch.randn(3, 4, 50).to(dtype)
    b = torch.randn(3, 40, 4).to(dtype)
    b2 = b.clone()
    b2[2, 7, 1] = bad
    entries = [native_entry(a, b), native_entry(a, b2)]
    out = torch.empty(24, dtype=torch.float64)
    assert native.lowrank_svdvals(entries, out, 2) == (1, 2)


def test_refuses_bad_arguments(native):
    a, b = torch.randn(8, 20), torch.randn(6, 8)  # r = 8 > m = 6: the dense route's case
    with pytest.raises(ValueError, match="field r"):
        native.lowrank_svdvals([native_entry(a, b)], torch.empty(8, dtype=torch.float64), 1)
    with pytest.raises(ValueError, match="field b_row_stride"):
        native.lowrank_svdvals([native_entry(a.T[:6], b.T[:, :6])], torch.empty(8, dtype=torch.float64), 1)
    with pytest.raises(ValueError, match="contiguous float64"):
        native.lowrank_svdvals([native_entry(a[:, :6], b[:, :6].T)], torch.empty(3, dtype=torch.float64), 1)


def _elf_dynamic_info(path: str) -> tuple[list[str], list[str]]:
    """(NEEDED libraries, undefined dynamic symbols) of a 64-bit little-endian ELF shared library."""
    data = open(path, "rb").read()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "expected a 64-bit little-endian ELF"
    shoff, shentsize, shnum = struct.unpack_from("<Q", data, 0x28)[0], *struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]

    def strings(index: int, at: int) -> str:
        start = sections[index][4] + at
        return data[start : data.index(b"\0", start)].decode()

    needed, undefined = [], []
    for _, kind, _, _, offset, size, link, _, _, entsize in sections:
        if kind == 6:  # SHT_DYNAMIC
            for j in range(size // 16):
                tag, value = struct.unpack_from("<qQ", data, offset + j * 16)
                if tag == 1:  # DT_NEEDED
                    needed.append(strings(link, value))
        elif kind == 11:  # SHT_DYNSYM
            for j in range(1, size // entsize):
                name, _, _, shndx, _, _ = struct.unpack_from("<IBBHQQ", data, offset + j * entsize)
                if shndx == 0:
                    undefined.append(strings(link, name))
    return needed, undefined


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the ELF format")
def test_library_has_no_tie_to_torch(native):
    """The built library links no torch library and needs no torch/c10 symbol: it loads under any torch."""
    path = str(native.installed_library() or os.environ[native.LIBRARY_ENV])
    needed, undefined = _elf_dynamic_info(path)
    assert needed, "the parser found no NEEDED entry at all"
    assert not [n for n in needed if "torch" in n or "c10" in n or "python" in n.lower()], needed
    assert undefined and "lf_lowrank_svdvals" not in undefined
    tied = [s for s in undefined if "c10" in s or "torch" in s or "at6Tensor" in s or s.startswith("Py")]
    assert not tied, tied
    assert not [n for n in needed if "gomp" in n or "iomp" in n or "omp" in n], needed  # no second OpenMP runtime


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=environ, cwd=os.sep
    )


CHECK_FALLBACK = """
    import warnings, torch
    from lora_fast.energy_rank import singular_values
    from lora_fast.ops import _backend
    a, b = torch.randn(4, 30, dtype=torch.float64), torch.randn(20, 4, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sigma = singular_values(a, b)
    ref = torch.linalg.svdvals(b @ a)[:4]
    assert ((sigma - ref).abs().max() / ref.max()) < 1e-12
    messages = [str(w.message) for w in caught if "native library" in str(w.message)]
    assert len(messages) == 1, messages
    print(messages[0])
    assert _backend.available_backends()[:1] == ["ref"] and "cpp" not in _backend.available_backends()
    """


def test_missing_library_warns_once_and_uses_the_reference(tmp_path):
    result = _run_python(CHECK_FALLBACK, LORA_FAST_NATIVE_LIB=str(tmp_path / "nothing.so"), LORA_FAST_BACKEND="")
    assert result.returncode == 0, result.stderr
    assert "could not be loaded" in result.stdout and "PyTorch reference" in result.stdout


def test_broken_library_warns_once_and_uses_the_reference(tmp_path):
    broken = tmp_path / "liblora_fast_native.so"
    broken.write_bytes(b"\x7fELF not really a library")
    result = _run_python(CHECK_FALLBACK, LORA_FAST_NATIVE_LIB=str(broken), LORA_FAST_BACKEND="")
    assert result.returncode == 0, result.stderr
    assert str(broken) in result.stdout


def test_forced_native_backend_without_library_raises(tmp_path):
    code = """
        import torch
        from lora_fast.energy_rank import singular_values
        singular_values(torch.randn(4, 30), torch.randn(20, 4))
        """
    result = _run_python(code, LORA_FAST_NATIVE_LIB=str(tmp_path / "x.so"), LORA_FAST_BACKEND="cpp")
    assert result.returncode != 0 and "LORA_FAST_BACKEND=cpp but lora_fast's native library is unavailable" in (
        result.stderr
    )
