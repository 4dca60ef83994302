"""lora_fast::lora_linear: CPU path and Triton kernels (interpreter) against an fp64 reference and PEFT."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_fast.layers import LoraLinear
from lora_fast.ops.lora_linear import dropout_keep_mask
from lora_fast.ops.lora_linear import lora_linear
from lora_fast.ops.lora_linear import lora_linear_ref

# extra absolute slack on top of the "2× the error of plain PyTorch in the same dtype" rule (flash-attn's)
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
GRAD_NAMES = ("x", "bias", "lora_A", "lora_B")


def _inputs(lead: tuple[int, ...], k: int, n: int, r: int, dtype: torch.dtype, bias: bool = True, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=gen)
    weight = torch.randn(n, k, generator=gen) / k**0.5
    lora_A = torch.randn(r, k, generator=gen) / k**0.5
    lora_B = torch.randn(n, r, generator=gen) / r**0.5  # random, not PEFT's zeros: dA must not vanish
    b = torch.randn(n, generator=gen) if bias else None
    grad = torch.randn(*lead, n, generator=gen)
    return [t.to(dtype) if t is not None else None for t in (x, weight, b, lora_A, lora_B, grad)]


def _forward_backward(fn, x, weight, bias, lora_A, lora_B, grad, **kwargs):
    """Output and grads (x, bias, A, B) of ``fn``; W stays frozen."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, bias, lora_A, lora_B)]
    y = fn(leaves[0], weight, leaves[1], leaves[2], leaves[3], **kwargs)
    y.backward(grad)
    return [y.detach()] + [t.grad if t is not None else None for t in leaves]


def _check_against_fp64(ours, inputs, scaling, keep=None, dropout_p=0.0):
    """|ours − ref64| ≤ 2·|ref_dtype − ref64| + atol, per output and gradient; fp32 also within 1e-5 relative."""
    dtype = inputs[0].dtype
    ref_kwargs = {"scaling": scaling, "keep_mask": keep, "dropout_p": dropout_p}
    ref64 = _forward_backward(lora_linear_ref, *[t.double() if t is not None else None for t in inputs], **ref_kwargs)
    ref_same_dtype = _forward_backward(lora_linear_ref, *inputs, **ref_kwargs)
    for name, got, exact, plain in zip(("y", *GRAD_NAMES), ours, ref64, ref_same_dtype, strict=True):
        if exact is None:
            assert got is None, name
            continue
        err = (got.double() - exact).abs().max().item()
        plain_err = (plain.double() - exact).abs().max().item()
        assert err <= 2 * plain_err + ATOL[dtype], f"{name}: error {err:.3g} vs plain {dtype} {plain_err:.3g}"
        if dtype == torch.float32:
            rel = err / exact.abs().max().item()
            assert rel <= 1e-5, f"{name}: relative error {rel:.3g} vs fp64"


def _through_op(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, seed=0):
    """The registered op itself (what torch.compile runs), not the eager autograd.Function."""
    return torch.ops.lora_fast.lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)[0]


ENTRY_POINTS = {"eager": lora_linear, "op": _through_op}


@pytest.mark.parametrize("r", [1, 8, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("entry", ["eager", "op"])
def test_cpu_path_matches_fp64(r: int, dtype: torch.dtype, bias: bool, entry: str) -> None:
    inputs = _inputs((3, 41), 123, 431, r, dtype, bias)
    ours = _forward_backward(ENTRY_POINTS[entry], *inputs, scaling=1.7)
    _check_against_fp64(ours, inputs, 1.7)


@pytest.mark.parametrize("entry", ["eager", "op"])
def test_cpu_path_dropout_matches_fp64_with_same_mask(entry: str) -> None:
    inputs = _inputs((57,), 123, 431, 8, torch.float32)
    ours = _forward_backward(ENTRY_POINTS[entry], *inputs, scaling=0.5, dropout_p=0.3, seed=1234)
    keep = dropout_keep_mask((57, 123), 0.3, 1234, "cpu")
    assert 0.6 < keep.float().mean().item() < 0.8
    _check_against_fp64(ours, inputs, 0.5, keep=keep, dropout_p=0.3)


def test_dropout_is_reproducible_and_seed_dependent() -> None:
    inputs = _inputs((33,), 45, 53, 7, torch.float32)
    first = _forward_backward(lora_linear, *inputs, scaling=1.0, dropout_p=0.5, seed=7)
    again = _forward_backward(lora_linear, *inputs, scaling=1.0, dropout_p=0.5, seed=7)
    other = _forward_backward(lora_linear, *inputs, scaling=1.0, dropout_p=0.5, seed=8)
    for a, b in zip(first, again, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(first[0], other[0])
    # LoraLinear draws the seed from torch's global generator: reseeding reproduces a training step
    layer = LoraLinear(nn.Linear(45, 53), r=4, lora_alpha=8, dropout=0.5).train()
    nn.init.normal_(layer.lora_B)
    x = torch.randn(9, 45)
    torch.manual_seed(3)
    y1 = layer(x)
    torch.manual_seed(3)
    torch.testing.assert_close(layer(x), y1, rtol=0, atol=0)
    torch.testing.assert_close(layer.eval()(x), layer(x), rtol=0, atol=0)  # eval: no dropout


def test_cpu_path_matches_peft_linear() -> None:
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Linear(123, 431)
    peft_layer = peft.tuners.lora.Linear(base, "default", peft.LoraConfig(r=8, lora_alpha=12), r=8, lora_alpha=12)
    nn.init.normal_(peft_layer.lora_B["default"].weight)
    ours = LoraLinear(base, r=8, lora_alpha=12)
    with torch.no_grad():
        ours.lora_A.copy_(peft_layer.lora_A["default"].weight)
        ours.lora_B.copy_(peft_layer.lora_B["default"].weight)
    base.bias.requires_grad_(True)  # compare the bias gradient too
    grads = {}
    for name, layer, params in [
        ("ours", ours, (ours.lora_A, ours.lora_B)),
        ("peft", peft_layer, (peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight)),
    ]:
        x = torch.randn(5, 17, 123, generator=torch.Generator().manual_seed(1), requires_grad=True)
        y = layer(x)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(2)))
        grads[name] = [y.detach(), x.grad, *(p.grad for p in params), base.bias.grad.clone()]
        base.bias.grad = None
    for name, a, b in zip(("y", "x", "lora_A", "lora_B", "bias"), grads["ours"], grads["peft"], strict=True):
        scale = b.abs().max().item()  # dA reaches ~1e3 here: compare relative to the largest entry
        assert (a - b).abs().max().item() <= 1e-5 * scale, name


def _check_autocast(inputs, scaling: float, cast: torch.dtype) -> None:
    """lora_linear on fp32 inputs under CPU autocast: y in the autocast dtype, fp32 gradients (the casts are part of
    the graph), and errors vs fp64 within 2× those of the reference run under the same autocast (nn.Linear's casts)."""
    with torch.autocast("cpu", dtype=cast):
        ours = _forward_backward(lora_linear, *inputs, scaling=scaling)
        plain = _forward_backward(lora_linear_ref, *inputs, scaling=scaling)
    exact_inputs = [t.double() if t is not None else None for t in inputs]
    ref64 = _forward_backward(lora_linear_ref, *exact_inputs, scaling=scaling)
    assert ours[0].dtype == plain[0].dtype == cast
    for name, got, exact, same_cast in zip(("y", *GRAD_NAMES), ours, ref64, plain, strict=True):
        if name != "y":
            assert got.dtype == torch.float32, name  # fp32 master weights keep fp32 gradients
        err = (got.double() - exact).abs().max().item()
        plain_err = (same_cast.double() - exact).abs().max().item()
        assert err <= 2 * plain_err + ATOL[cast], f"{name}: error {err:.3g} vs nn.Linear under autocast {plain_err:.3g}"


@pytest.mark.parametrize("cast", [torch.bfloat16, torch.float16])
def test_cpu_autocast_follows_nn_linear(cast: torch.dtype) -> None:
    _check_autocast(_inputs((3, 41), 123, 431, 7, torch.float32), 1.7, cast)


def test_autocast_leaves_float64_alone_and_rejects_mixed() -> None:
    x, weight, bias, lora_A, lora_B, _ = _inputs((4,), 12, 10, 3, torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lora_linear(x, weight, bias, lora_A, lora_B, 1.0).dtype == torch.float64  # as nn.Linear: f64 not cast
        with pytest.raises(TypeError, match="dtype"):
            lora_linear(x, weight.float(), bias, lora_A, lora_B, 1.0)  # the fp32 weight goes to bf16, x stays f64


def test_trainable_weight_gets_dense_gradient() -> None:
    x, weight, bias, lora_A, lora_B, grad = _inputs((11,), 23, 19, 3, torch.float64)
    weight.requires_grad_(True)
    lora_linear(x, weight, bias, lora_A, lora_B, 2.0).backward(grad)
    torch.testing.assert_close(weight.grad, grad.t() @ x)


def test_opcheck_cpu() -> None:
    x, weight, bias, lora_A, lora_B, _ = _inputs((2, 5), 13, 11, 3, torch.float64)
    x.requires_grad_(True)
    lora_A.requires_grad_(True)
    for b, p in [(bias, 0.0), (None, 0.0), (bias, 0.25)]:
        torch.library.opcheck(torch.ops.lora_fast.lora_linear.default, (x, weight, b, lora_A, lora_B, 0.5, p, 3))


@pytest.mark.parametrize("cast", [None, torch.bfloat16])
def test_torch_compile_fullgraph_matches_eager(cast: torch.dtype | None) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        LoraLinear(nn.Linear(45, 53), 7, 14), nn.GELU(), LoraLinear(nn.Linear(53, 31, bias=False), 3, 3)
    )
    for layer in (model[0], model[2]):
        nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 9, 45)
    autocast = torch.autocast("cpu", dtype=cast or torch.bfloat16, enabled=cast is not None)
    with autocast:
        expected = model(x)
    expected.float().sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    with autocast:
        y = compiled(x)
    y.float().sum().backward()
    tol = 1e-5 if cast is None else 2e-2  # bf16: the compiled graph may round intermediate products differently
    assert y.dtype == expected.dtype == (cast or torch.float32)
    torch.testing.assert_close(y, expected, rtol=tol, atol=tol)
    for got, want in zip([p.grad for p in model.parameters() if p.requires_grad], eager_grads, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())


def test_bad_inputs_raise() -> None:
    x, weight, bias, lora_A, lora_B, _ = _inputs((4,), 12, 10, 3, torch.float32)
    with pytest.raises(ValueError, match="features"):
        lora_linear(x[:, :11], weight, bias, lora_A, lora_B, 1.0)
    with pytest.raises(ValueError, match="lora_A"):
        lora_linear(x, weight, bias, lora_A[:, :11], lora_B, 1.0)
    with pytest.raises(ValueError, match="lora_B"):
        lora_linear(x, weight, bias, lora_A, lora_B[:, :2], 1.0)
    with pytest.raises(ValueError, match="bias"):
        lora_linear(x, weight, bias[:9], lora_A, lora_B, 1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        lora_linear(x, weight, bias, lora_A, lora_B, 1.0, dropout_p=1.0)
    with pytest.raises(TypeError, match="dtype"):
        lora_linear(x.double(), weight, bias, lora_A, lora_B, 1.0)


# --- Triton kernels under TRITON_INTERPRET=1 (set by tests/conftest.py before any kernel is defined) ---

TRITON_CASES = [
    # (r, dtype, bias, dropout_p)
    (1, torch.float32, True, 0.0),
    (7, torch.float32, False, 0.25),
    (33, torch.float32, True, 0.0),
    (7, torch.bfloat16, True, 0.0),
    (33, torch.bfloat16, False, 0.25),
    (1, torch.float16, True, 0.25),
    (7, torch.float16, False, 0.0),
]


@pytest.fixture
def triton_backend(monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton kernels on CPU need TRITON_INTERPRET=1 set before import")
    monkeypatch.setenv("LORA_FAST_BACKEND", "triton")
    from lora_fast.ops.triton import lora_linear as triton_impl

    return triton_impl


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(("r", "dtype", "bias", "dropout_p"), TRITON_CASES)
def test_triton_op_matches_fp64(triton_backend, r: int, dtype: torch.dtype, bias: bool, dropout_p: float) -> None:
    inputs = [t.to(_device()) if t is not None else None for t in _inputs((37,), 45, 53, r, dtype, bias)]
    entry = ENTRY_POINTS["op" if r == 33 else "eager"]  # the registered op's autograd once per rank class
    ours = _forward_backward(entry, *inputs, scaling=1.3, dropout_p=dropout_p, seed=99)
    keep = triton_backend.dropout_keep_mask((37, 45), dropout_p, 99, _device()) if dropout_p else None
    _check_against_fp64(ours, inputs, 1.3, keep=keep, dropout_p=dropout_p)


@pytest.mark.parametrize("cast", [torch.bfloat16, torch.float16])
def test_triton_autocast_follows_nn_linear(triton_backend, cast: torch.dtype) -> None:
    if torch.cuda.is_available():
        pytest.skip("CPU autocast case; on CUDA the kernels run the cast inputs the same way")
    _check_autocast(_inputs((37,), 45, 53, 7, torch.float32), 1.3, cast)


@pytest.mark.parametrize("r", [256, 300, 512])
def test_triton_large_ranks_and_3d_input(triton_backend, r: int) -> None:
    # above 256 the rank spans several blocks in every kernel (the dY pass used to drop ranks past the first block)
    inputs = [t.to(_device()) for t in _inputs((2, 9), 21, 19, r, torch.float32)]
    ours = _forward_backward(lora_linear, *inputs, scaling=0.25)
    _check_against_fp64(ours, inputs, 0.25)


def test_triton_autotune_bucket_is_stable_across_batch_lengths(triton_backend) -> None:
    buckets = {triton_backend._m_bucket(m) for m in range(993, 1025)}  # 32 batch lengths after padding trims
    assert buckets == {1024}
    assert [triton_backend._m_bucket(m) for m in (1, 16, 17, 4096, 4097)] == [16, 16, 32, 4096, 8192]


def test_triton_dropout_reproducible_and_only_requested_grads(triton_backend) -> None:
    x, weight, bias, lora_A, lora_B, grad = [t.to(_device()) for t in _inputs((37,), 45, 53, 7, torch.float32)]
    lora_A.requires_grad_(True)
    lora_B.requires_grad_(True)  # x and bias frozen, as in a first layer: no dX, no dbias
    outs = []
    for _ in range(2):
        y = lora_linear(x, weight, bias, lora_A, lora_B, 1.0, dropout_p=0.5, seed=5)
        y.backward(grad)
        outs.append((y.detach(), lora_A.grad.clone(), lora_B.grad.clone()))
        lora_A.grad = lora_B.grad = None
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=0)
    for a, b in zip(outs[0][1:], outs[1][1:], strict=True):  # atomics: summation order may differ in the last bits
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    keep = triton_backend.dropout_keep_mask((37, 45), 0.5, 5, _device())
    assert 0.35 < keep.float().mean().item() < 0.65
    assert not torch.equal(keep, triton_backend.dropout_keep_mask((37, 45), 0.5, 6, _device()))


# Compiles every kernel (bf16 and fp32, dropout on/off) for sm_80 (A100) and sm_90 (H100/H200) with Triton's bundled
# ptxas, without a GPU, in a subprocess because this process's kernels were defined under the interpreter. Also checks
# that the autotuned GEMMs are keyed on M's power-of-two bucket, not on M.
_SM_COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lora_fast.ops.triton import lora_linear as T

for launcher in (T._fwd_launch, T._dx_launch):
    assert list(launcher.keys) == ["M_BUCKET", "N", "K", "R"], launcher.keys
FP32_BUFFERS = {"db_ptr", "dyb_ptr", "dbias_ptr", "da_ptr"}
FLOATS = {"p", "inv_keep", "scaling", "dyb_scale"}
GEMM = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}
DY_PASS = {"NEED_DB": 1, "NEED_DYB": 1, "BLOCK_M": 64}
KERNELS = [
    (T._xa_kernel, {"HAS_DROPOUT": True, "BLOCK_M": 32, "BLOCK_K": 64, "BLOCK_R": 16}, 4),
    (T._fwd_kernel, {**GEMM, "HAS_BIAS": True, "BLOCK_R": 16}, 8),
    (T._dy_pass_kernel, {**DY_PASS, "NEED_DBIAS": 1, "BLOCK_N": 128, "BLOCK_R": 16}, 4),
    (T._dy_pass_kernel, {**DY_PASS, "NEED_DBIAS": 1, "BLOCK_N": 32, "BLOCK_R": 256}, 4),
    (T._dx_kernel, {**GEMM, "HAS_DROPOUT": True, "BLOCK_R": 16}, 8),
    (T._dx_kernel, {**GEMM, "HAS_DROPOUT": False, "BLOCK_R": 64}, 8),
    (T._da_kernel, {"HAS_DROPOUT": True, "BLOCK_M": 64, "BLOCK_K": 64, "BLOCK_R": 16}, 4),
    (T._mask_kernel, {"BLOCK_M": 32, "BLOCK_K": 32}, 4),
]
# every kernel in bf16, and the fp32 ("ieee" dot) variant of the forward GEMM; 128-wide fp32 tiles take ~45 s each
VARIANTS = [("bf16", "tf32", k) for k in KERNELS] + [("fp32", "ieee", KERNELS[1])]
for arch in (80, 90):
    for dtype, precision, (kernel, constexprs, warps) in VARIANTS:
        values = {k: bool(v) if k.startswith("NEED_") else v for k, v in constexprs.items()}
        if dtype == "fp32":
            values = {k: min(v, 64) if k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") else v for k, v in values.items()}
        signature = {}
        for param in kernel.params:
            name = param.name
            if param.is_constexpr:
                signature[name] = "constexpr"
                values.setdefault(name, precision)  # PRECISION, the only constexpr not listed above
            elif name == "keep_ptr":
                signature[name] = "*i8"
            elif name.endswith("_ptr"):
                signature[name] = "*fp32" if name in FP32_BUFFERS else f"*{dtype}"
            else:
                signature[name] = "fp32" if name in FLOATS else "i32"
        source = ASTSource(fn=kernel, signature=signature, constexprs=values)
        triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": 3})
        print("compiled", f"sm_{arch}", kernel.__name__, dtype, flush=True)
"""


@pytest.mark.slow
def test_triton_kernels_compile_for_sm80_and_sm90() -> None:
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _SM_COMPILE], capture_output=True, text=True, env=env, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("compiled sm_80") == result.stdout.count("compiled sm_90") == 9


def test_autocast_casts_an_input_shared_by_several_layers_once() -> None:
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountCasts(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.casts = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.ops.aten._to_copy.default and args[0].shape == (9, 45):
                self.casts += 1
            return func(*args, **kwargs)

    layers = [_inputs((9,), 45, 53, r, torch.float32, seed=r)[1:5] for r in (2, 3, 4)]  # q, k, v reading one x
    x = torch.randn(9, 45, requires_grad=True)
    grads = []
    for shared in (True, False):
        counter = CountCasts()
        with torch.autocast("cpu", dtype=torch.bfloat16), counter:
            inputs = [x if shared else x.clone() for _ in layers]  # clones: three different inputs, three casts
            outputs = [lora_linear(inp, *params, 0.5) for inp, params in zip(inputs, layers, strict=True)]
        assert counter.casts == (1 if shared else 3)
        grads.append(torch.autograd.grad(sum(y.float().sum() for y in outputs), x)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-2, atol=1e-2)  # bf16 sum before the cast vs after
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = lora_linear(x, *layers[0], 0.5)
        with torch.no_grad():
            x.add_(1.0)  # a changed input is cast again, not taken from the previous call
        after = lora_linear(x, *layers[0], 0.5)
        assert not torch.equal(before, after)
