"""Triton kernels for ``y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ`` and its backward (fp32 accumulation throughout).

Forward, two launches:
  1. ``_xa_kernel``: xa = dropout(x) Aᵀ (M×r), the dropout mask drawn in-kernel from (seed, row·k + col) by Philox.
  2. ``_fwd_kernel``: the base GEMM x Wᵀ with the LoRA expand xa (s·B)ᵀ and the bias in its epilogue, so y is
     written once and no M×n LoRA term ever reaches memory.
Backward, three launches (dW only if asked, by the caller):
  1. ``_dy_pass_kernel``: one pass over dY gives dB = s·dYᵀ xa, dYB = s/(1-p)·dY B (M×r) and dbias = Σ dY.
  2. ``_dx_kernel``: dX = dY W + (dYB A) ⊙ keep as one GEMM, the LoRA term appended along the reduction
     dimension (``[dY | dYB] · [W ; A]``) when there is no dropout; the mask is regenerated from the seed.
  3. ``_da_kernel``: dA = dYBᵀ dropout(x), the mask regenerated again (nothing M×k is saved).
Kernels 1 of backward and ``_da_kernel`` split M across programs and reduce with fp32 atomics, so their grids fill
a GPU even though their outputs (n×r, r×k) are small. Every kernel covers any rank: ranks come in blocks (a grid
dimension or a loop). Block sizes are fixed here; on CUDA the two big GEMMs are autotuned over a handful of
configurations, keyed on (N, K, r) and M rounded up to a power of two.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["dropout_keep_mask", "lora_linear_bwd", "lora_linear_fwd"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not go through TF32 (10-bit mantissa): the fp32 path promises 1e-5 relative error
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_r(r: int, cap: int = 256) -> int:
    # tl.dot needs every dimension >= 16
    return min(max(16, triton.next_power_of_2(r)), cap)


# The interpreter's numpy tl.dot misreads bf16 operands (errors of 1e10 on a 16×16 product), so under it the operands
# are upcast first; bf16×bf16 products are exact in fp32, which is what the tensor cores compute too.
_UPCAST_DOT = tl.constexpr(_INTERPRET)


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr):
    if _UPCAST_DOT:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION)
    return out


@triton.jit
def _keep(seed, rows, cols, K, p):
    return tl.rand(seed, rows[:, None] * K + cols[None, :]) >= p


@triton.jit
def _mask_kernel(keep_ptr, M, K, p, seed, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    in_bounds = (rows[:, None] < M) & (cols[None, :] < K)
    tl.store(keep_ptr + rows[:, None] * K + cols[None, :], _keep(seed, rows, cols, K, p).to(tl.int8), mask=in_bounds)


@triton.jit
def _xa_kernel(
    x_ptr, a_ptr, xa_ptr, M, K, R,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_om, stride_or,
    p, inv_keep, seed,
    HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
            mask=(rows[:, None] < M) & (cols[None, :] < K),
            other=0.0,
        )
        if HAS_DROPOUT:
            x = tl.where(_keep(seed, rows, cols, K, p), x, tl.zeros_like(x))
        a_t = tl.load(
            a_ptr + ranks[None, :] * stride_ar + cols[:, None] * stride_ak,
            mask=(ranks[None, :] < R) & (cols[:, None] < K),
            other=0.0,
        )
        acc = _mma(x, a_t, acc, PRECISION)
    if HAS_DROPOUT:
        acc *= inv_keep
    tl.store(
        xa_ptr + rows[:, None] * stride_om + ranks[None, :] * stride_or,
        acc.to(xa_ptr.dtype.element_ty),
        mask=(rows[:, None] < M) & (ranks[None, :] < R),
    )


@triton.jit
def _grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # programs that run together share row panels of the left operand (L2 reuse), as in Triton's matmul tutorial
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _fwd_kernel(
    x_ptr, w_ptr, bias_ptr, xa_ptr, b_ptr, y_ptr, M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_xam, stride_xar, stride_bn, stride_br, stride_ym, stride_yn,
    scaling,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    outs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
            mask=(rows[:, None] < M) & (cols[None, :] < K),
            other=0.0,
        )
        w_t = tl.load(
            w_ptr + outs[None, :] * stride_wn + cols[:, None] * stride_wk,
            mask=(outs[None, :] < N) & (cols[:, None] < K),
            other=0.0,
        )
        acc = _mma(x, w_t, acc, PRECISION)
    # epilogue: the rank-r expand, a K=r GEMM on the same output tile
    lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        ranks = r0 + tl.arange(0, BLOCK_R)
        xa = tl.load(
            xa_ptr + rows[:, None] * stride_xam + ranks[None, :] * stride_xar,
            mask=(rows[:, None] < M) & (ranks[None, :] < R),
            other=0.0,
        )
        b_t = tl.load(
            b_ptr + outs[None, :] * stride_bn + ranks[:, None] * stride_br,
            mask=(outs[None, :] < N) & (ranks[:, None] < R),
            other=0.0,
        )
        lora = _mma(xa, b_t, lora, PRECISION)
    acc += scaling * lora
    if HAS_BIAS:
        acc += tl.load(bias_ptr + outs, mask=outs < N, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + rows[:, None] * stride_ym + outs[None, :] * stride_yn,
        acc.to(y_ptr.dtype.element_ty),
        mask=(rows[:, None] < M) & (outs[None, :] < N),
    )


@triton.jit
def _dy_pass_kernel(
    dy_ptr, xa_ptr, b_ptr, db_ptr, dyb_ptr, dbias_ptr, M, N, R, rows_per_program,
    stride_dym, stride_dyn, stride_xam, stride_xar, stride_bn, stride_br,
    scaling, dyb_scale,
    NEED_DB: tl.constexpr, NEED_DYB: tl.constexpr, NEED_DBIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # program (pid_n, pid_s, pid_r) reads dY[rows of split pid_s, cols of block pid_n] once for rank block pid_r
    # (ranks above BLOCK_R = 256 take more than one block, and re-read dY per block)
    outs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_start = tl.program_id(1) * rows_per_program
    row_end = min(row_start + rows_per_program, M)
    ranks = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    b = tl.load(
        b_ptr + outs[:, None] * stride_bn + ranks[None, :] * stride_br,
        mask=(outs[:, None] < N) & (ranks[None, :] < R),
        other=0.0,
    )
    d_b = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    d_bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        dy = tl.load(
            dy_ptr + rows[:, None] * stride_dym + outs[None, :] * stride_dyn,
            mask=(rows[:, None] < row_end) & (outs[None, :] < N),
            other=0.0,
        )
        if NEED_DB:
            xa = tl.load(
                xa_ptr + rows[:, None] * stride_xam + ranks[None, :] * stride_xar,
                mask=(rows[:, None] < row_end) & (ranks[None, :] < R),
                other=0.0,
            )
            d_b = _mma(tl.trans(dy), xa, d_b, PRECISION)
        if NEED_DYB:
            partial = _mma(dy, b, tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), PRECISION) * dyb_scale
            tl.atomic_add(
                dyb_ptr + rows[:, None] * R + ranks[None, :],
                partial,
                mask=(rows[:, None] < row_end) & (ranks[None, :] < R),
            )
        if NEED_DBIAS:  # summed by every rank block, stored by the first
            d_bias += tl.sum(dy.to(tl.float32), axis=0)
    if NEED_DB:
        tl.atomic_add(
            db_ptr + outs[:, None] * R + ranks[None, :], d_b * scaling, mask=(outs[:, None] < N) & (ranks[None, :] < R)
        )
    if NEED_DBIAS:
        if tl.program_id(2) == 0:
            tl.atomic_add(dbias_ptr + outs, d_bias, mask=outs < N)


@triton.jit
def _dx_kernel(
    dy_ptr, w_ptr, dyb_ptr, a_ptr, dx_ptr, M, N, K, R, M_BUCKET,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_ar, stride_ak, stride_dxm, stride_dxk,
    p, seed,
    HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_k = _grouped_tile(M, K, BLOCK_M, BLOCK_K, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        outs = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(
            dy_ptr + rows[:, None] * stride_dym + outs[None, :] * stride_dyn,
            mask=(rows[:, None] < M) & (outs[None, :] < N),
            other=0.0,
        )
        w = tl.load(
            w_ptr + outs[:, None] * stride_wn + cols[None, :] * stride_wk,
            mask=(outs[:, None] < N) & (cols[None, :] < K),
            other=0.0,
        )
        acc = _mma(dy, w, acc, PRECISION)
    # [dY | dYB] · [W ; A]: the rank-r part continues the same reduction (a separate one only to apply the mask)
    lora = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        ranks = r0 + tl.arange(0, BLOCK_R)
        dyb = tl.load(
            dyb_ptr + rows[:, None] * R + ranks[None, :], mask=(rows[:, None] < M) & (ranks[None, :] < R), other=0.0
        )
        a = tl.load(
            a_ptr + ranks[:, None] * stride_ar + cols[None, :] * stride_ak,
            mask=(ranks[:, None] < R) & (cols[None, :] < K),
            other=0.0,
        )
        if HAS_DROPOUT:
            lora = _mma(dyb.to(a.dtype), a, lora, PRECISION)
        else:
            acc = _mma(dyb.to(a.dtype), a, acc, PRECISION)
    if HAS_DROPOUT:
        acc += tl.where(_keep(seed, rows, cols, K, p), lora, 0.0)
    tl.store(
        dx_ptr + rows[:, None] * stride_dxm + cols[None, :] * stride_dxk,
        acc.to(dx_ptr.dtype.element_ty),
        mask=(rows[:, None] < M) & (cols[None, :] < K),
    )


@triton.jit
def _da_kernel(
    dyb_ptr, x_ptr, da_ptr, M, K, R, rows_per_program,
    stride_xm, stride_xk,
    p, seed,
    HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_start = tl.program_id(1) * rows_per_program
    row_end = min(row_start + rows_per_program, M)
    ranks = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
            mask=(rows[:, None] < row_end) & (cols[None, :] < K),
            other=0.0,
        )
        if HAS_DROPOUT:
            x = tl.where(_keep(seed, rows, cols, K, p), x, tl.zeros_like(x))
        dyb = tl.load(
            dyb_ptr + rows[:, None] * R + ranks[None, :],
            mask=(rows[:, None] < row_end) & (ranks[None, :] < R),
            other=0.0,
        )
        acc = _mma(tl.trans(dyb.to(x.dtype)), x, acc, PRECISION)
    tl.atomic_add(da_ptr + ranks[:, None] * K + cols[None, :], acc, mask=(ranks[:, None] < R) & (cols[None, :] < K))


def _gemm_configs(block_m: str, block_n: str, block_k: str) -> list[triton.Config]:
    shapes = [
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (128, 128, 32, 4, 4),
        (64, 128, 64, 4, 4),
    ]
    return [
        triton.Config({block_m: bm, block_n: bn, block_k: bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in shapes
    ]


# The interpreter runs every autotune candidate, so it gets one small fixed configuration instead.
if _INTERPRET:
    _fwd_launch = _fwd_kernel
    _dx_launch = _dx_kernel
    _FWD_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}
    _DX_BLOCKS = {"BLOCK_M": 32, "BLOCK_K": 32, "BLOCK_N": 32, "GROUP_M": 2}
else:
    # keyed on M's power-of-two bucket, not M: training trims padding per batch, so M changes almost every step and
    # an exact key would re-tune (5 configurations, ~100 launches) at nearly every step
    _TUNE_KEY = ["M_BUCKET", "N", "K", "R"]
    _fwd_launch = triton.autotune(_gemm_configs("BLOCK_M", "BLOCK_N", "BLOCK_K"), key=_TUNE_KEY)(_fwd_kernel)
    _dx_launch = triton.autotune(_gemm_configs("BLOCK_M", "BLOCK_K", "BLOCK_N"), key=_TUNE_KEY)(_dx_kernel)
    _FWD_BLOCKS = {}
    _DX_BLOCKS = {}


def _m_bucket(rows: int) -> int:
    """The autotuning bucket of a GEMM with ``rows`` rows: the next power of two (16 at least)."""
    return max(16, triton.next_power_of_2(rows))


def _row_splits(rows: int, block_m: int, other_programs: int, device: torch.device) -> tuple[int, int]:
    """(programs along M, rows each) so that a reduction over M fills about two waves of the GPU."""
    row_tiles = triton.cdiv(rows, block_m)
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 2 * other_programs  # interpreter: still exercise the atomic reduction across programs
    splits = max(1, min(row_tiles, triton.cdiv(target, max(other_programs, 1))))
    rows_per_program = triton.cdiv(row_tiles, splits) * block_m
    return triton.cdiv(rows, rows_per_program), rows_per_program


def _check_int32_indexing(*tensors: Tensor) -> None:
    # offsets (row · stride + col) and Philox counters are int32 in the kernels
    for t in tensors:
        if t.numel() >= 2**31:
            raise ValueError(f"the Triton LoRA kernels index with int32; a tensor of {t.numel()} elements is too large")


def dropout_keep_mask(shape: tuple[int, int], dropout_p: float, seed: int, device: torch.device | str) -> Tensor:
    """The bool keep mask (M, k) that these kernels draw for ``seed`` (for tests and debugging).

    Args:
        shape: (M, k), the flattened input's shape.
        dropout_p: drop probability.
        seed: the seed passed to the op.
        device: where to draw the mask.
    """
    rows, cols = shape
    keep = torch.empty(shape, dtype=torch.int8, device=device)
    grid = (triton.cdiv(rows, 32), triton.cdiv(cols, 32))
    _mask_kernel[grid](keep, rows, cols, dropout_p, seed, BLOCK_M=32, BLOCK_K=32)
    return keep.bool()


def lora_linear_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
) -> tuple[Tensor, Tensor]:
    """(y, xa) for 2-D x (M, k): y (M, n) and xa = dropout(x) Aᵀ (M, r), both in x's dtype.

    Args:
        x: input (M, k).
        weight: base weight (n, k).
        bias: (n,) or None.
        lora_A: (r, k).
        lora_B: (n, r).
        scaling: the LoRA scale s.
        dropout_p: drop probability on the LoRA branch.
        seed: Philox seed of the dropout mask.
    """
    (M, K), N, R = x.shape, weight.shape[0], lora_A.shape[0]
    precision = _dot_precision(x.dtype)
    xa = torch.empty((M, R), dtype=x.dtype, device=x.device)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    _check_int32_indexing(x, y)
    if M == 0:
        return y, xa
    block_r = _block_r(R)
    # 32-row tiles: 8192 tokens give 256 programs for a memory-bound pass over x (64-row tiles leave 128 for 132 SMs)
    xa_blocks = (32, 32) if _INTERPRET else (32, 64)
    _xa_kernel[(triton.cdiv(M, xa_blocks[0]), triton.cdiv(R, block_r))](
        x, lora_A, xa, M, K, R,
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), xa.stride(0), xa.stride(1),
        dropout_p, 1.0 / (1.0 - dropout_p), seed,
        HAS_DROPOUT=dropout_p > 0.0, PRECISION=precision,
        BLOCK_M=xa_blocks[0], BLOCK_K=xa_blocks[1], BLOCK_R=block_r,
    )  # fmt: skip

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _fwd_launch[grid](
        x, weight, bias if bias is not None else y, xa, lora_B, y, M, N, K, R, _m_bucket(M),
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), xa.stride(0), xa.stride(1),
        lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(1),
        scaling,
        HAS_BIAS=bias is not None, PRECISION=precision, BLOCK_R=_block_r(R, cap=64),
        **_FWD_BLOCKS,
    )  # fmt: skip
    return y, xa


def lora_linear_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    xa: Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
    needs: list[bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """(dx, dA, dB, dbias) for 2-D dy (M, n), x (M, k) and the forward's xa (M, r); None where not needed.

    Args:
        dy: gradient of y (M, n).
        x: input (M, k).
        weight: base weight (n, k).
        lora_A: (r, k).
        lora_B: (n, r).
        xa: the forward's dropout(x) Aᵀ (M, r).
        scaling: the LoRA scale s.
        dropout_p: drop probability used in forward.
        seed: the forward's dropout seed (the mask is regenerated from it).
        needs: flags for (x, weight, bias, lora_A, lora_B); the weight flag is handled by the caller.
    """
    need_x, _, need_bias, need_A, need_B = needs
    (M, K), N, R = x.shape, weight.shape[0], lora_A.shape[0]
    precision = _dot_precision(x.dtype)
    has_dropout = dropout_p > 0.0
    need_dyb = need_x or need_A
    f32 = {"dtype": torch.float32, "device": x.device}
    d_B = torch.zeros((N, R), **f32) if need_B else None
    d_bias = torch.zeros((N,), **f32) if need_bias else None
    dyb = torch.zeros((M, R), **f32) if need_dyb else None
    if M == 0:
        dx = torch.zeros_like(x) if need_x else None
        d_A = torch.zeros_like(lora_A) if need_A else None
        return dx, d_A, _cast(d_B, x.dtype), _cast(d_bias, x.dtype)

    block_r = _block_r(R)
    if _INTERPRET:
        block_m, block_n = 32, 32
    else:
        # wider column tiles halve the fp32 atomics into dYB (M·r per column tile); the n×r dB accumulator lives in
        # registers, so the tile narrows as r grows
        block_m, block_n = 64, (128 if R <= 32 else 64 if R <= 64 else 32)
    if need_B or need_dyb or need_bias:
        n_tiles, r_tiles = triton.cdiv(N, block_n), triton.cdiv(R, block_r)
        splits, rows_per_program = _row_splits(M, block_m, n_tiles * r_tiles, x.device)
        placeholder = x  # never dereferenced: its NEED_* flag is off
        _dy_pass_kernel[(n_tiles, splits, r_tiles)](
            dy, xa, lora_B, d_B if need_B else placeholder, dyb if need_dyb else placeholder,
            d_bias if need_bias else placeholder, M, N, R, rows_per_program,
            dy.stride(0), dy.stride(1), xa.stride(0), xa.stride(1), lora_B.stride(0), lora_B.stride(1),
            scaling, scaling / (1.0 - dropout_p),
            NEED_DB=need_B, NEED_DYB=need_dyb, NEED_DBIAS=need_bias, PRECISION=precision,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r,
        )  # fmt: skip

    dx = None
    if need_x:
        dx = torch.empty_like(x)

        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]),)

        _dx_launch[grid](
            dy, weight, dyb, lora_A, dx, M, N, K, R, _m_bucket(M),
            dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1),
            dx.stride(0), dx.stride(1),
            dropout_p, seed,
            HAS_DROPOUT=has_dropout, PRECISION=precision, BLOCK_R=_block_r(R, cap=64),
            **_DX_BLOCKS,
        )  # fmt: skip

    d_A = None
    if need_A:
        d_A32 = torch.zeros((R, K), **f32)
        block_k = 32 if _INTERPRET else 64
        da_block_r = _block_r(R, cap=64)
        k_tiles, r_tiles = triton.cdiv(K, block_k), triton.cdiv(R, da_block_r)
        splits, rows_per_program = _row_splits(M, block_m, k_tiles * r_tiles, x.device)
        _da_kernel[(k_tiles, splits, r_tiles)](
            dyb, x, d_A32, M, K, R, rows_per_program,
            x.stride(0), x.stride(1),
            dropout_p, seed,
            HAS_DROPOUT=has_dropout, PRECISION=precision,
            BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=da_block_r,
        )  # fmt: skip
        d_A = d_A32.to(x.dtype)
    return dx, d_A, _cast(d_B, x.dtype), _cast(d_bias, x.dtype)


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return t.to(dtype) if t is not None else None
