"""Shrink a saved LoRA adapter: every ΔW = s·B·A replaced by its best rank-j approximation, without forming B·A.

Ranks are chosen per module (``threshold``: the energy rank; ``rank``: at most N) or globally for a budget
(``params``: LoRA parameters; ``size_mb``: weights-file size): a greedy pass over the σ² of all modules, largest
σ² per parameter first, so the budget goes where the energy is. The result is written in the input's format (a PEFT
folder, or a kohya file), atomically, and every module keeps its scaling s: PEFT gets ``rank_pattern`` and
``alpha_pattern`` (alpha' = s·j, or s·√j with rsLoRA) keyed by full module names.

How, per group of modules of equal rank (the r × r work batched): the float64 Gram matrices G_B = BᵀB and G_A = A Aᵀ
give R factors B = Q_B R_B, Aᵀ = Q_A R_A by Cholesky (after scaling B's columns and A's rows to unit norm, which keeps
it accurate whatever their norms); the r × r core R_B R_Aᵀ = U Σ Wᵀ
gives σ(B·A) = Σ, and the truncated factors are B' = B·(R_B⁻¹ U_j Σ_j^½), A' = (Σ_j^½ W_jᵀ R_A⁻ᵀ)·A, so that
B'·A' = Q_B U_j Σ_j W_jᵀ Q_Aᵀ is the Eckart–Young truncation. Cost O((m+n)·r²) per module instead of the O(m·n·min(m,n))
of the dense SVD. Factors whose Gram matrix is too ill-conditioned for this (cond > 1e3, or rank-deficient) go through
``lora_fast.energy_rank.truncate`` (Householder QR in float64) instead.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lora_fast.adapters import CONFIG_NAME
from lora_fast.adapters import Adapter
from lora_fast.adapters import AdapterError
from lora_fast.adapters import LoraPair
from lora_fast.adapters import is_lora_key
from lora_fast.adapters import read_adapter
from lora_fast.energy_rank import energy_rank
from lora_fast.energy_rank import truncate
from lora_fast.peft_rules import alpha_for_scaling
from lora_fast.peft_rules import lora_scaling
from lora_fast.peft_rules import most_common
from lora_fast.peft_rules import pattern_from_values

__all__ = ["ModuleShrink", "ShrinkResult", "plan_ranks", "shrink"]

# Cholesky-QR-type R factors from a float64 Gram matrix lose orthogonality like eps64·cond²: cond ≤ 1e3 keeps Q_B, Q_A
# orthonormal to ~1e-10; worse factors take the Householder route.
_GRAM_MAX_COND = 1e3
# B·(R_B⁻¹ …) in float32 is off by ~ √r·eps32·cond(B) relative (cond 4, r 64: ~2e-6), a few float32 roundings of the
# stored result; above that the product runs in float64 (about 2× the time on this CPU).
_FLOAT32_PRODUCT_MAX_COND = 4.0
# modules whose r×r eigen/SVD work runs as one batched call
_CHUNK = 64


@dataclass
class ModuleShrink:
    """What shrinking did to one module.

    Attributes:
        name: module name.
        r: rank before.
        rank: rank kept (0: the module was dropped).
        shape: (m, n) of the (flattened) ΔW.
        scaling: s of ΔW = s·B·A, kept.
        energy: ‖ΔW‖²_F = Σσ².
        kept: share of ``energy`` the kept rank holds (1.0 for a zero update).
    """

    name: str
    r: int
    rank: int
    shape: tuple[int, int]
    scaling: float
    energy: float
    kept: float


@dataclass
class ShrinkResult:
    """Summary of ``shrink``.

    Attributes:
        source: the adapter read.
        out: where the shrunk adapter went (a folder).
        format: ``"peft"`` or ``"kohya"``.
        modules: one entry per module, in file order.
        params_before: LoRA parameters before (Σ r·(m+n)).
        params_after: LoRA parameters after.
        file_bytes: size of the written weights file.
        relative_error: ‖ΔW − ΔW'‖_F / ‖ΔW‖_F over all modules together (from σ; exact up to rounding).
    """

    source: str
    out: str
    format: str
    modules: list[ModuleShrink]
    params_before: int
    params_after: int
    file_bytes: int
    relative_error: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Factored:
    """One module's σ of B·A (descending, float64) and how to get truncated factors from the stored ones."""

    sigma: torch.Tensor
    map_b: torch.Tensor | None = None  # (r, k): B' = B @ map_b[:, :j]
    map_a: torch.Tensor | None = None  # (k, r): A' = map_a[:j] @ A
    float32_b: bool = False
    float32_a: bool = False
    exact_a: torch.Tensor | None = None  # Householder route: A' = exact_a[:j], B' = exact_b[:, :j]
    exact_b: torch.Tensor | None = None


# ---- factorisation ---------------------------------------------------------------------------------------------


def _groups(pairs: Sequence[LoraPair]) -> list[list[int]]:
    """Indices of pairs with equal ranks, in chunks of at most ``_CHUNK`` (their r×r work is batched)."""
    by_rank: dict[int, list[int]] = {}
    for i, pair in enumerate(pairs):
        by_rank.setdefault(pair.r, []).append(i)
    return [idx[s : s + _CHUNK] for idx in by_rank.values() for s in range(0, len(idx), _CHUNK)]


def _equilibrated_r_factor(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For Gram matrices G = XᵀX (c, r, r): column scales d = diag(G)^-½, R̃ with X D = Q R̃ (upper, Cholesky of D G D),
    and cond(X D) (inf where X has a zero column, G is not finite, or Cholesky fails).

    Scaling the columns first makes the route as accurate as the columns' directions allow, whatever their norms
    (trained B columns differ by orders of magnitude), and the float32 products below depend on cond(X D), not
    cond(X), because the scaling cancels in them entry by entry.
    """
    diag = gram.diagonal(dim1=-2, dim2=-1)
    usable = torch.isfinite(gram).all(-1).all(-1) & (diag > 0).all(-1)
    d = torch.where(usable.unsqueeze(-1), diag, 1.0).rsqrt()
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype)
    scaled = torch.where(usable[:, None, None], d.unsqueeze(-1) * gram * d.unsqueeze(-2), eye)
    lower, info = torch.linalg.cholesky_ex(scaled)
    usable &= info == 0
    scaled = torch.where(usable[:, None, None], scaled, eye)
    try:
        lam = torch.linalg.eigvalsh(scaled)  # values only: a third of eigh's time at r=64
    except torch.linalg.LinAlgError:  # did not converge for some member: the others keep the fast route
        lam = torch.ones(gram.shape[:-1], dtype=gram.dtype)
        for i in range(gram.shape[0]):
            try:
                lam[i] = torch.linalg.eigvalsh(scaled[i])
            except torch.linalg.LinAlgError:
                usable[i] = False
    cond = torch.where(usable & (lam[:, 0] > 0), (lam[:, -1] / lam[:, 0]).sqrt(), torch.inf)
    return d, lower.mT, cond


@torch.no_grad()
def _factor_chunk(pairs: Sequence[LoraPair]) -> list[_Factored]:
    """σ and truncation maps for pairs of equal rank r: A (r, n), B (m, r)."""
    grams_a, grams_b = [], []
    # one pass over each factor, copied to float64 (float32 Gram products lose ~eps32·cond²) into a reused buffer
    # (2× faster here than a fresh float64 tensor per factor), and XᵀX through NumPy, whose matmul calls BLAS syrk
    # for a product with its own transpose: half the flops of torch's gemm (7B, r=64: 0.54 s of CPU instead of 0.88)
    buffer = torch.empty(max(max(p.A.numel(), p.B.numel()) for p in pairs), dtype=torch.float64)
    for pair in pairs:
        a64 = buffer[: pair.A.numel()].view(pair.A.shape).copy_(pair.A).numpy()
        grams_a.append(torch.from_numpy(a64 @ a64.T))
        b64 = buffer[: pair.B.numel()].view(pair.B.shape).copy_(pair.B).numpy()
        grams_b.append(torch.from_numpy(b64.T @ b64))
    d_a, r_a, cond_a = _equilibrated_r_factor(torch.stack(grams_a))
    d_b, r_b, cond_b = _equilibrated_r_factor(torch.stack(grams_b))
    good = (cond_a <= _GRAM_MAX_COND) & (cond_b <= _GRAM_MAX_COND)
    out: list[_Factored] = []
    if bool(good.any()):
        # Ã = D_A A = R̃_Aᵀ Q_Aᵀ and B̃ = B D_B = Q_B R̃_B, so B A = Q_B [R̃_B D_B⁻¹ D_A⁻¹ R̃_Aᵀ] Q_Aᵀ: the SVD U Σ Wᵀ of
        # that r×r core gives B' = B·(D_B R̃_B⁻¹ U Σ^½) and A' = (Σ^½ Wᵀ R̃_A⁻ᵀ D_A)·A
        ra, rb, da, db = r_a[good], r_b[good], d_a[good], d_b[good]
        core = rb @ ((1.0 / (db * da)).unsqueeze(-1) * ra.mT)
        u, s, wh = torch.linalg.svd(core)
        half = s.sqrt().unsqueeze(-2)
        map_b = db.unsqueeze(-1) * torch.linalg.solve_triangular(rb, u * half, upper=True)
        map_a = (da.unsqueeze(-1) * torch.linalg.solve_triangular(ra, wh.mT * half, upper=True)).mT
        fast_a = (cond_a[good] <= _FLOAT32_PRODUCT_MAX_COND).tolist()
        fast_b = (cond_b[good] <= _FLOAT32_PRODUCT_MAX_COND).tolist()
    g = 0
    for i, ok in enumerate(good.tolist()):
        if ok:
            out.append(_Factored(s[g], map_b[g], map_a[g], fast_b[g], fast_a[g]))
            g += 1
            continue
        pair = pairs[i]
        k = min(pair.r, pair.shape[0], pair.shape[1])
        try:  # Householder QR + r×r SVD in float64: rank-deficient, ill-conditioned or huge factors
            exact_a, exact_b = truncate(pair.A.to(torch.float64), pair.B.to(torch.float64), rank=k)
        except ValueError as exc:
            raise AdapterError(f"the adapter of {pair.name!r}: {exc}") from None
        # truncate splits Σ evenly: A' = Σ^½ Vᵀ Q_Aᵀ, whose rows have squared norms σ
        out.append(_Factored(exact_a.square().sum(-1), exact_a=exact_a, exact_b=exact_b))
    return out


def _factor_all(pairs: Sequence[LoraPair], chunks: list[list[int]], bar: Any) -> list[_Factored]:
    factored: list[_Factored | None] = [None] * len(pairs)
    for idx in chunks:
        for i, f in zip(idx, _factor_chunk([pairs[i] for i in idx]), strict=True):
            factored[i] = f
        bar.update(len(idx))
    return factored  # type: ignore[return-value]


@torch.no_grad()
def _truncated(pair: LoraPair, f: _Factored, j: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A' (j, n), B' (m, j)); a module keeping its full rank keeps its factors."""
    if j == pair.r:
        return pair.A, pair.B  # the update is unchanged: keep the factors bit for bit
    if f.exact_a is not None:
        return f.exact_a[:j], f.exact_b[:, :j]
    dtype = torch.float32 if pair.A.dtype != torch.float64 else torch.float64
    dtype_a = dtype if f.float32_a else torch.float64
    dtype_b = dtype if f.float32_b else torch.float64
    new_a = f.map_a[:j].to(dtype_a) @ pair.A.to(dtype_a)
    new_b = pair.B.to(dtype_b) @ f.map_b[:, :j].to(dtype_b)
    return new_a, new_b


# ---- choosing ranks --------------------------------------------------------------------------------------------


def plan_ranks(
    sigmas: Sequence[torch.Tensor],
    costs: Sequence[int],
    *,
    threshold: float | None = None,
    rank: int | None = None,
    budget: int | None = None,
) -> list[int]:
    """Kept rank per module, by exactly one rule.

    Args:
        sigmas: singular values of each ΔW (scaling included), descending.
        costs: what one unit of rank costs per module (parameters m+n, or bytes), for ``budget``.
        threshold: per module, the energy rank at this share of its energy (``energy_rank``; 0 for a zero ΔW).
        rank: per module, min(rank, available rank).
        budget: total cost: greedy over all modules' σ², largest σ² per unit of cost first; a module whose next
            σ² does not fit stops growing. σ = 0 is never bought.
    """
    if sum(x is not None for x in (threshold, rank, budget)) != 1:
        raise ValueError("plan_ranks: give exactly one of threshold, rank or budget")
    if threshold is not None:
        return [int(j) for j in energy_rank([s.to(torch.float64) for s in sigmas], threshold)]
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        return [min(rank, s.numel()) for s in sigmas]
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ValueError(f"budget must be a non-negative int, got {budget!r}")
    gains = torch.cat([s.to(torch.float64).square() for s in sigmas]).numpy()
    owner = np.repeat(np.arange(len(sigmas)), [s.numel() for s in sigmas])
    cost = np.asarray(costs, dtype=np.float64)[owner]
    order = np.argsort(-(gains / cost), kind="stable")  # stable: within a module, σ in order
    ranks = [0] * len(sigmas)
    closed = [False] * len(sigmas)
    spent = 0
    for item in order:
        if gains[item] <= 0:
            break
        i = owner[item]
        if closed[i]:
            continue
        if spent + costs[i] <= budget:
            ranks[i] += 1
            spent += costs[i]
        else:
            closed[i] = True
    return ranks


# ---- writing ---------------------------------------------------------------------------------------------------


def _written_alpha(scaling: float, j: int, use_rslora: bool, dtype: torch.dtype | None = None) -> tuple[float, float]:
    """(alpha' to store, factor by which to multiply B'·A') so that the reader's scaling times B'·A' is s·(B·A)_j."""
    alpha = alpha_for_scaling(scaling, j, use_rslora)
    if dtype is not None:  # kohya stores alpha as a tensor: take its rounding into account
        alpha = float(torch.tensor(alpha, dtype=dtype))
    written = lora_scaling(alpha, j, use_rslora)
    return alpha, scaling / written


def _module_key(key_a: str) -> str:
    for marker in (".lora_A", ".lora_embedding_A", ".lora_down", ".lora.down"):
        if marker in key_a:
            return key_a[: key_a.rindex(marker)]
    raise AssertionError(key_a)


def _peft_tensors(adapter: Adapter, new: dict[int, tuple[torch.Tensor, torch.Tensor]], fix: dict[int, float]):
    tensors = {key: adapter.tensors[key] for key in adapter.tensors if not is_lora_key(key)}
    for i, (a, b) in new.items():
        pair = adapter.pairs[i]
        key_a, key_b = pair.keys
        if pair.adalora:  # written as plain LoRA
            module = _module_key(key_a)
            key_a, key_b = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
        a, b = _apply_fix(a, b, fix.get(i, 1.0))
        shape_a, shape_b = pair.shapes
        j = a.shape[0]
        tensors[key_a] = a.reshape(j, *shape_a[1:]).to(pair.A.dtype).contiguous()
        tensors[key_b] = b.reshape(shape_b[0], j, *shape_b[2:]).to(pair.B.dtype).contiguous()
    return tensors


def _apply_fix(a: torch.Tensor, b: torch.Tensor, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    if abs(factor - 1.0) < 1e-12:  # float rounding of alpha' = s·j: far below the factors' own precision
        return a, b
    root = math.sqrt(abs(factor))
    return a * root, b * (math.copysign(root, factor))


def _peft_config(adapter: Adapter, ranks: list[int]) -> tuple[dict[str, Any], dict[int, float]]:
    settings = adapter.settings
    if settings is not None and not settings.is_adalora:
        raw = dict(settings.raw)
        use_rslora = settings.use_rslora
    else:  # no config (alpha given) or AdaLoRA: a plain LoRA config
        raw = {"peft_type": "LORA", "use_rslora": False, "use_dora": False, "bias": "none", "inference_mode": True}
        if settings is not None:
            for key in ("task_type", "base_model_name_or_path", "modules_to_save", "lora_dropout", "fan_in_fan_out"):
                if key in settings.raw:
                    raw[key] = settings.raw[key]
        use_rslora = False
    raw["peft_type"] = "LORA"
    kept = {i: j for i, j in enumerate(ranks) if j > 0}
    module_ranks, module_alphas, fix = {}, {}, {}
    for i, j in kept.items():
        pair = adapter.pairs[i]
        if j == pair.r and not pair.adalora and settings is not None and not settings.is_adalora:
            module_alphas[pair.name] = settings.alpha_for(pair.name)  # untouched module: its own alpha
        else:
            module_alphas[pair.name], fix[i] = _written_alpha(pair.scaling, j, use_rslora)
        module_ranks[pair.name] = j
    r, lora_alpha = most_common(module_ranks.values()), most_common(module_alphas.values())
    raw["r"], raw["lora_alpha"] = r, lora_alpha
    raw["rank_pattern"] = pattern_from_values(module_ranks, r)
    raw["alpha_pattern"] = pattern_from_values(module_alphas, lora_alpha)
    targets = settings.target_modules if settings is not None and not settings.is_adalora else None
    if targets is None or len(kept) < len(ranks):
        raw["target_modules"] = sorted(module_ranks)  # full names: exactly the modules that keep an update
    return raw, fix


def _kohya_tensors(adapter: Adapter, ranks: list[int], new: dict[int, tuple[torch.Tensor, torch.Tensor]]):
    dropped = {_module_key(adapter.pairs[i].keys[0]) for i, j in enumerate(ranks) if j == 0}
    tensors = {}
    for key, tensor in adapter.tensors.items():
        module = key.removesuffix(".alpha")
        if not is_lora_key(key) and not (key.endswith(".alpha") and module in dropped):
            tensors[key] = tensor
    for i, (a, b) in new.items():
        pair = adapter.pairs[i]
        module = _module_key(pair.keys[0])
        alpha_tensor = adapter.tensors.get(f"{module}.alpha")
        dtype = alpha_tensor.dtype if alpha_tensor is not None else torch.float32
        j = a.shape[0]
        if j == pair.r:
            fix = 1.0
            alpha = float(alpha_tensor) if alpha_tensor is not None else float(j)
        else:
            alpha, fix = _written_alpha(pair.scaling, j, False, dtype)
        a, b = _apply_fix(a, b, fix)
        shape_a, shape_b = pair.shapes
        tensors[pair.keys[0]] = a.reshape(j, *shape_a[1:]).to(pair.A.dtype).contiguous()
        tensors[pair.keys[1]] = b.reshape(shape_b[0], j, *shape_b[2:]).to(pair.B.dtype).contiguous()
        tensors[f"{module}.alpha"] = torch.tensor(alpha, dtype=dtype)
    return tensors


def _header_bound(keys: Sequence[str]) -> int:
    # safetensors: 8-byte length + JSON {"key":{"dtype":"F32","shape":[..],"data_offsets":[..]}, …} padded to 8
    return 8 + 64 + sum(len(json.dumps(key)) + 100 for key in keys) + 8


def _bytes_for_factors(adapter: Adapter, size_mb: float, smallest: int) -> int:
    """Bytes of a ``size_mb`` weights file left for LoRA factors once copied tensors and the header are counted."""
    copied = [k for k in adapter.tensors if not is_lora_key(k)]
    fixed = sum(adapter.tensors[k].numel() * adapter.tensors[k].element_size() for k in copied)
    new_keys = [k for p in adapter.pairs for k in (*p.keys, _module_key(p.keys[0]) + ".alpha")]
    fixed += 8 * len(adapter.pairs) + _header_bound([*copied, *new_keys])  # 8: a kohya alpha scalar per module
    budget = int(size_mb * 1e6) - fixed
    if budget < smallest:
        raise AdapterError(
            f"size {size_mb:g} MB leaves no room for LoRA factors: the other tensors and the file header take "
            f"{fixed / 1e6:.3f} MB"
        )
    return budget


# ---- entry point -----------------------------------------------------------------------------------------------


def _check_shrinkable(adapter: Adapter, alpha: float | None) -> None:
    where = adapter.path
    if adapter.dora:
        raise AdapterError(
            f"{where}: a DoRA adapter: DoRA divides W + s·B·A by its column norms, which a truncated B·A changes, and "
            "keeping its magnitude vector exact needs the base model's weights; shrink refuses DoRA adapters "
            "(analyze measures their low-rank part s·B·A)"
        )
    settings = adapter.settings
    if settings is not None and settings.raw.get("lora_bias"):
        raise AdapterError(f"{where}: lora_bias is set; shrink keeps LoRA factors only and refuses such adapters")
    if adapter.format == "peft" and settings is None and alpha is None:
        raise AdapterError(
            f"{where}: no {CONFIG_NAME} beside it: give a config or an alpha, so that the scaling is known"
        )
    names = {p.adapter for p in adapter.pairs}
    if len(names) > 1:
        raise AdapterError(f"{where}: holds several adapters ({', '.join(sorted(map(str, names)))}): pick one")


def shrink(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    threshold: float | None = None,
    rank: int | None = None,
    params: int | None = None,
    size_mb: float | None = None,
    adapter_name: str | None = None,
    config: Any = None,
    alpha: float | None = None,
    force: bool = False,
    progress: bool = False,
) -> ShrinkResult:
    """Write a smaller copy of a saved LoRA adapter whose every ΔW is the best rank-j approximation of the original's.

    Give exactly one of ``threshold``, ``rank``, ``params`` or ``size_mb`` (see the module docstring). Modules kept at
    full rank are copied bit for bit; modules given rank 0 are dropped (``target_modules`` then lists the kept
    modules by full name). ``modules_to_save`` weights and other non-LoRA tensors are copied.

    Args:
        source: PEFT adapter folder (or a named adapter in it, see ``adapter_name``), weights file, or kohya file.
        out: output folder; a PEFT folder, or for kohya input a folder holding the file under its input name.
        threshold: keep per module the energy rank at this share of its energy, in (0, 1].
        rank: keep at most this rank per module.
        params: keep at most this many LoRA parameters (Σ j·(m+n)) in all.
        size_mb: keep the weights file at most this many MB (10⁶ bytes), copied tensors included.
        adapter_name: the named adapter to shrink.
        config: LoRA config to use instead of the folder's ``adapter_config.json``.
        alpha: alpha of a weights file without config.
        force: replace ``out`` if it exists.
        progress: show a progress bar (on stderr, after one second).

    Raises:
        AdapterError: bad or unsupported input (DoRA, lora_bias, unknown scaling, several adapters), a budget too
            small to keep anything; FileExistsError: ``out`` exists and ``force`` is False. Nothing is written then.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from lora_fast.peft_io import WEIGHTS_NAME
    from lora_fast.peft_io import staged_folder
    from lora_fast.peft_io import write_adapter_folder

    if sum(x is not None for x in (threshold, rank, params, size_mb)) != 1:
        raise ValueError("shrink: give exactly one of threshold, rank, params or size_mb")
    if threshold is not None and not 0.0 < float(threshold) <= 1.0:
        raise ValueError(f"shrink: threshold must be in (0, 1], got {threshold}")
    if size_mb is not None and not (isinstance(size_mb, (int, float)) and math.isfinite(size_mb) and size_mb > 0):
        raise ValueError(f"shrink: size must be a positive number of MB, got {size_mb!r}")
    if params is not None and (isinstance(params, bool) or not isinstance(params, int) or params < 1):
        raise ValueError(f"shrink: params must be a positive int, got {params!r}")
    out = Path(out)
    if (out.exists() or out.is_symlink()) and not force:
        raise FileExistsError(f"{out}: exists; choose another folder or replace it (force)")
    with warnings.catch_warnings():  # without config or alpha, _check_shrinkable refuses a PEFT file: say it once
        warnings.filterwarnings("ignore", message=".*no adapter config or alpha given")
        adapter = read_adapter(source, adapter_name=adapter_name, config=config, alpha=alpha)
    _check_shrinkable(adapter, alpha)
    pairs = adapter.pairs
    chunks = _groups(pairs)
    # one bar over factoring, truncating and writing; shown only when the work takes more than a second
    bar = tqdm(total=2 * len(pairs) + 1, desc="shrink", unit="step", disable=not progress, delay=1.0, file=sys.stderr)
    try:
        factored = _factor_all(pairs, chunks, bar)
        sigmas = [f.sigma * abs(p.scaling) for f, p in zip(factored, pairs, strict=True)]
        if params is not None or size_mb is not None:
            per_rank = [p.shape[0] + p.shape[1] for p in pairs]
            budget = params
            if size_mb is not None:
                per_rank = [n * p.A.element_size() for n, p in zip(per_rank, pairs, strict=True)]
                budget = _bytes_for_factors(adapter, size_mb, min(per_rank))
            ranks = plan_ranks(sigmas, per_rank, budget=budget)
        else:
            ranks = plan_ranks(sigmas, [0] * len(pairs), threshold=threshold, rank=rank)
        if not any(ranks):
            raise AdapterError(f"{adapter.path}: every ΔW would be dropped (all zero, or a budget below one rank)")
        new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, (pair, f, j) in enumerate(zip(pairs, factored, ranks, strict=True)):
            if j > 0:
                new[i] = _truncated(pair, f, j)
            bar.update(1)
        if adapter.format == "kohya":
            tensors = _kohya_tensors(adapter, ranks, new)
            with staged_folder(out, replace=force, keep_other_files=False) as temp:
                save_file(tensors, str(temp / adapter.path.name), metadata={"format": "pt"})
            weights = out / adapter.path.name
        else:
            config_dict, fix = _peft_config(adapter, ranks)
            tensors = _peft_tensors(adapter, new, fix)
            write_adapter_folder(out, config_dict, tensors, replace=force, keep_other_files=False)
            weights = out / WEIGHTS_NAME
        bar.update(1)
    finally:
        bar.close()

    modules, lost, total = [], 0.0, 0.0
    for pair, sigma, j in zip(pairs, sigmas, ranks, strict=True):
        energy = sigma.square()
        whole = float(energy.sum())
        kept = float(energy[:j].sum())
        total += whole
        lost += max(whole - kept, 0.0)
        share = kept / whole if whole > 0 else 1.0
        modules.append(ModuleShrink(pair.name, pair.r, j, pair.shape, pair.scaling, whole, share))
    return ShrinkResult(
        source=str(adapter.path),
        out=str(out),
        format=adapter.format,
        modules=modules,
        params_before=sum(p.r * (p.shape[0] + p.shape[1]) for p in pairs),
        params_after=sum(j * (p.shape[0] + p.shape[1]) for p, j in zip(pairs, ranks, strict=True)),
        file_bytes=weights.stat().st_size,
        relative_error=math.sqrt(lost / total) if total > 0 else 0.0,
    )
