"""How much rank do LoRA adapters use? Singular values and energy ranks of ΔW = s·B·A, batched and cheap.

All functions work without forming the m×n update: QR of B and of Aᵀ, then the SVD of an r×r core, which costs
O((m+n)·r²) per adapter instead of the O(m·n·min(m,n)) of a dense SVD.

Example::

    from lora_fast.energy_rank import analyze, singular_values, energy_rank, truncate

    sigma = singular_values(A, B, scaling=2.0)        # A (..., r, n), B (..., m, r) -> (..., min(r, m, n))
    energy_rank(sigma)                                # smallest j holding >= 95% of sum(sigma^2)
    A_j, B_j = truncate(A, B, threshold=0.95)         # exact factors of the best rank-j approximation
    for rec in analyze(peft_model):                   # every adapter of a model, state dict or saved adapter
        print(rec.name, rec.layer, rec.kind, rec.r, rec.energy_rank)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lora_fast.adapters import Adapter
from lora_fast.adapters import LoraPair
from lora_fast.adapters import find_pairs
from lora_fast.ops.lowrank_svd import dense_svdvals
from lora_fast.ops.lowrank_svd import lowrank_svdvals
from lora_fast.ops.lowrank_svd import lowrank_svdvals_eager
from lora_fast.ops.lowrank_svd import prefers_dense_route

__all__ = ["AdapterRecord", "analyze", "energy_rank", "singular_values", "truncate"]

TensorOrList = torch.Tensor | Sequence[torch.Tensor]


def _check_pair(a: Any, b: Any, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise ValueError(f"{where}: A and B must be tensors, got {type(a).__name__} and {type(b).__name__}")
    if a.ndim < 2 or b.ndim < 2:
        raise ValueError(f"{where}: A must be (..., r, n) and B (..., m, r); got ndim {a.ndim} and {b.ndim}")
    if a.shape[:-2] != b.shape[:-2]:
        raise ValueError(f"{where}: leading (batch) dims differ: A {tuple(a.shape)}, B {tuple(b.shape)}")
    if a.shape[-2] != b.shape[-1]:
        raise ValueError(
            f"{where}: inner ranks differ: A {tuple(a.shape)} has r={a.shape[-2]}, "
            f"B {tuple(b.shape)} has r={b.shape[-1]}"
        )
    if a.numel() == 0 or b.numel() == 0:
        raise ValueError(f"{where}: empty adapter, A {tuple(a.shape)}, B {tuple(b.shape)}")
    if not (a.is_floating_point() and b.is_floating_point()):
        raise ValueError(f"{where}: A and B must be floating point, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{where}: A is on {a.device} but B is on {b.device}")
    dtype = torch.promote_types(a.dtype, b.dtype)
    # float16/bfloat16 adapters are analysed in float32: their own precision is far below what sigma needs.
    dtype = dtype if dtype == torch.float64 else torch.float32
    return (a, b) if a.dtype == b.dtype == dtype else (a.to(dtype), b.to(dtype))


@torch.no_grad()
def _batched_svdvals(pairs: list[tuple[torch.Tensor, torch.Tensor]], scales: list[float]) -> list[torch.Tensor]:
    """σ for each (A (batch, r, n), B (batch, m, r)) pair, or 2-D pair: one op call for all low-rank-route pairs."""
    out: list[torch.Tensor | None] = [None] * len(pairs)
    lowrank = []
    for i, (a, b) in enumerate(pairs):
        if prefers_dense_route(a.shape[-2], b.shape[-2], a.shape[-1]):
            if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
                raise ValueError(f"singular_values: adapter {i} contains NaN or Inf")
            out[i] = dense_svdvals(a, b, scales[i])
        else:
            lowrank.append(i)
    if lowrank:
        by_device: dict[torch.device, list[int]] = {}
        for i in lowrank:
            by_device.setdefault(pairs[i][0].device, []).append(i)
        # the registered op under torch.compile; its eager body otherwise (the wrapper costs ~8 us per tensor)
        op = lowrank_svdvals if torch.compiler.is_compiling() else lowrank_svdvals_eager
        for idx in by_device.values():
            sigmas = op(
                [pairs[i][0].contiguous() for i in idx],
                [pairs[i][1].contiguous() for i in idx],
                [scales[i] for i in idx],
            )
            for i, s in zip(idx, sigmas, strict=True):
                out[i] = s
    return out  # type: ignore[return-value]


def singular_values(A: TensorOrList, B: TensorOrList, scaling: float | Sequence[float] | torch.Tensor = 1.0):
    """Singular values, descending, of ``scaling * B @ A`` without forming the product.

    Args:
        A: (..., r, n) tensor, or a list of such tensors (adapters of different shapes).
        B: (..., m, r) tensor with the same leading dims, or a list matching ``A``.
        scaling: a float; for a batched tensor also a tensor broadcastable to the leading dims; for lists also a
            sequence of floats, one per adapter. Its sign does not matter.

    Returns:
        (..., min(r, m, n)) tensor (a list of them for list input), float64 for float64 input and float32
        otherwise. Computed in float64. Not differentiable.

    Raises:
        ValueError: mismatched inner ranks or batch dims, ndim < 2, empty input, non-float dtype, NaN/Inf.
    """
    if isinstance(A, torch.Tensor) or isinstance(B, torch.Tensor):
        a, b = _check_pair(A, B, "singular_values")
        lead = a.shape[:-2]
        a3 = a.reshape(-1, *a.shape[-2:])
        b3 = b.reshape(-1, *b.shape[-2:])
        scale_tensor = torch.as_tensor(scaling, dtype=torch.float64)
        if scale_tensor.ndim == 0:
            sigma = _batched_svdvals([(a3, b3)], [float(scale_tensor)])[0]
            return sigma.reshape(*lead, sigma.shape[-1])
        sigma = _batched_svdvals([(a3, b3)], [1.0])[0].reshape(*lead, -1)
        try:
            scale_tensor = scale_tensor.abs().to(sigma).expand(lead).unsqueeze(-1)
        except RuntimeError as exc:
            raise ValueError(
                f"singular_values: scaling of shape {tuple(scale_tensor.shape)} does not broadcast "
                f"to the batch dims {tuple(lead)}"
            ) from exc
        return sigma * scale_tensor
    A, B = list(A), list(B)
    if not A:
        raise ValueError("singular_values: empty list of adapters")
    if len(A) != len(B):
        raise ValueError(f"singular_values: {len(A)} A matrices but {len(B)} B matrices")
    if isinstance(scaling, (int, float)):
        scales = [float(scaling)] * len(A)
    else:
        scales = [float(s) for s in scaling]
        if len(scales) != len(A):
            raise ValueError(f"singular_values: {len(scales)} scalings for {len(A)} adapters")
    pairs = [_check_pair(a, b, f"singular_values: adapter {i}") for i, (a, b) in enumerate(zip(A, B, strict=True))]
    # 2-D adapters (the usual case) go as they are; deeper batches are flattened to (batch, r, n) and back
    flat = [(a, b) if a.ndim <= 3 else (a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])) for a, b in pairs]
    sigmas = _batched_svdvals(flat, scales)
    return [s if a.ndim <= 3 else s.reshape(*a.shape[:-2], -1) for s, (a, _) in zip(sigmas, pairs, strict=True)]


def _check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    return threshold


def energy_rank(sigma: torch.Tensor | Sequence[torch.Tensor], threshold: float = 0.95):
    """Smallest j with ``sum(σ[:j]²) >= threshold * sum(σ²)``: the rank that holds ``threshold`` of the energy.

    The comparison is ``>=`` (as in PEFT's rank conversion), so a spectrum whose top-j values hold exactly the
    threshold gets j. An all-zero spectrum has energy rank 0.

    Args:
        sigma: (..., k) singular values (any order; they are sorted), or a list of 1-D spectra.
        threshold: fraction of energy in (0, 1].

    Returns:
        int64 tensor of shape (...), or a list of ints for list input.
    """
    threshold = _check_threshold(threshold)
    if not isinstance(sigma, torch.Tensor):
        spectra = list(sigma)
        if not spectra:
            raise ValueError("energy_rank: empty list of spectra")
        if all(isinstance(s, torch.Tensor) and s.ndim == 1 for s in spectra) and len({s.device for s in spectra}) == 1:
            # zero padding changes neither the cumulative nor the total energy: one batched call for all
            padded = torch.nn.utils.rnn.pad_sequence([s.to(torch.float64) for s in spectra], batch_first=True)
            return energy_rank(padded, threshold).tolist()
        return [energy_rank(s, threshold).tolist() for s in spectra]
    if sigma.ndim == 0 or sigma.shape[-1] == 0:
        raise ValueError(f"energy_rank: sigma must be (..., k) with k >= 1, got shape {tuple(sigma.shape)}")
    if not sigma.is_floating_point():
        sigma = sigma.to(torch.float64)
    if not bool(torch.isfinite(sigma).all()):
        raise ValueError("energy_rank: sigma contains NaN or Inf")
    if bool((sigma < 0).any()):
        raise ValueError("energy_rank: singular values must be non-negative")
    energy = sigma.to(torch.float64).sort(dim=-1, descending=True).values.square().cumsum(-1)
    total = energy[..., -1:]
    # count of prefixes still below the threshold, +1; zero spectra hold no energy and get 0
    rank = (energy < threshold * total).sum(-1) + 1
    return torch.where(total.squeeze(-1) > 0, rank, torch.zeros_like(rank))


def truncate(A: torch.Tensor, B: torch.Tensor, rank: int | None = None, *, threshold: float | None = None):
    """Exact factors (A', B') of the best rank-j approximation of ``B @ A`` (Eckart–Young), without forming it.

    ``B' @ A'`` equals ``U_j Σ_j V_jᵀ`` of ``B @ A``; the singular values are split evenly (B' = U_j√Σ_j,
    A' = √Σ_j V_jᵀ) so both factors keep comparable scale for further training.

    Args:
        A: (..., r, n).
        B: (..., m, r).
        rank: target rank j, 0 <= j <= min(r, m, n).
        threshold: instead of ``rank``, keep the energy rank at this threshold; for a batch, the largest energy
            rank in it (every member then keeps at least ``threshold`` of its energy).

    Returns:
        (A' (..., j, n), B' (..., m, j)) in the dtype of the inputs.
    """
    if (rank is None) == (threshold is None):
        raise ValueError("truncate: give exactly one of rank or threshold")
    a, b = _check_pair(A, B, "truncate")
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        raise ValueError("truncate: adapter contains NaN or Inf")
    k = min(a.shape[-2], a.shape[-1], b.shape[-2])
    q_b, r_b = torch.linalg.qr(b.to(torch.float64))  # B = Q_B R_B, Q_B (m, min(m, r))
    q_a, r_a = torch.linalg.qr(a.to(torch.float64).mT)  # Aᵀ = Q_A R_A
    u, s, vh = torch.linalg.svd(r_b @ r_a.mT)  # B A = Q_B U Σ Vᵀ Q_Aᵀ
    if threshold is not None:
        rank = int(energy_rank(s[..., :k], threshold).max())
    if not isinstance(rank, int) or not 0 <= rank <= k:
        raise ValueError(f"truncate: rank must be an int in [0, {k}] (min of r, m, n), got {rank!r}")
    root = s[..., :rank].sqrt()
    b_new = (q_b @ u[..., :, :rank]) * root.unsqueeze(-2)
    a_new = root.unsqueeze(-1) * (vh[..., :rank, :] @ q_a.mT)
    dtype = torch.promote_types(A.dtype, B.dtype)
    return a_new.to(dtype), b_new.to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# analyze: every adapter of a model or a saved adapter


@dataclass
class AdapterRecord:
    """One LoRA adapter's spectrum.

    Attributes:
        name: module name without PEFT's ``base_model.model.`` prefix.
        layer: first integer component of the name (the block index), or None.
        kind: matrix kind: the module's own name (``query``, ``q_proj``), or its path inside the block when that
            name is generic (``attention.output.dense`` vs ``output.dense``).
        r: adapter rank (rows of A).
        shape: (out_features, in_features) of ΔW.
        scaling: s in ΔW = s·B·A (1.0 when no config was available).
        energy_rank: smallest j holding ``threshold`` of the energy.
        sigma: singular values of ΔW, descending, float32/float64 on the adapter's device.
        adapter: PEFT adapter name, if any.
        dora: a DoRA layer: ``sigma`` is that of the low-rank direction update s·B·A; the magnitude vector that
            rescales each column of W + s·B·A is not part of it.
    """

    name: str
    layer: int | None
    kind: str
    r: int
    shape: tuple[int, int]
    scaling: float
    energy_rank: int
    sigma: torch.Tensor
    adapter: str | None = None
    dora: bool = False

    def as_dict(self) -> dict[str, Any]:
        """JSON-able view (sigma as a list of floats)."""
        return {
            "name": self.name,
            "layer": self.layer,
            "kind": self.kind,
            "r": self.r,
            "shape": list(self.shape),
            "scaling": self.scaling,
            "energy_rank": self.energy_rank,
            "sigma": self.sigma.detach().cpu().tolist(),
            "adapter": self.adapter,
            "dora": self.dora,
        }


def analyze(
    source: torch.nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike | Adapter,
    threshold: float = 0.95,
    *,
    config: Mapping[str, Any] | str | os.PathLike | Any | None = None,
    adapter_name: str | None = None,
    alpha: float | None = None,
    progress: bool = False,
) -> list[AdapterRecord]:
    """Spectra and energy ranks of every LoRA adapter in ``source``, from one batched call.

    Args:
        source: a PEFT model, a model with lora_fast adapters, a state dict (PEFT's saved keys
            ``….lora_A.weight``, in-memory ``….lora_A.<adapter>.weight``, or lora_fast's ``….lora_A``), a saved
            adapter (PEFT folder, weights file or kohya file; see ``lora_fast.adapters``), or an ``Adapter`` read by
            ``lora_fast.adapters.read_adapter``.
        threshold: energy fraction for ``energy_rank``.
        config: LoRA config (dict, ``LoraConfig`` or path to ``adapter_config.json``) giving ``lora_alpha``,
            ``use_rslora`` and ``alpha_pattern`` for state dicts; read from the adapter folder when present.
            Modules carry their own scaling and ignore it.
        adapter_name: only this PEFT adapter (default: all).
        alpha: alpha for a state dict or weights file without config (scaling alpha / r).
        progress: show a progress bar (stderr) when the work takes more than a second.

    Returns:
        One record per adapter, in model/state-dict order.

    Raises:
        ValueError: unreadable or inconsistent input (``lora_fast.adapters.AdapterError`` names file and key), a
            threshold outside (0, 1], NaN or Inf in a factor (the module is named).
    """
    threshold = _check_threshold(threshold)
    pairs = (
        source.pairs
        if isinstance(source, Adapter)
        else find_pairs(source, config=config, adapter_name=adapter_name, alpha=alpha)
    )
    sigmas = _spectra(pairs, progress)
    ranks = energy_rank(sigmas, threshold)
    records = []
    for pair, sigma, rank in zip(pairs, sigmas, ranks, strict=True):
        layer, kind = pair.layer_and_kind()
        records.append(
            AdapterRecord(
                pair.name, layer, kind, pair.r, pair.shape, pair.scaling, rank, sigma, pair.adapter, pair.dora
            )
        )
    return records


def _spectra(pairs: Sequence[LoraPair], progress: bool) -> list[torch.Tensor]:
    """σ of every pair's ΔW: one batched call, or chunks of 32 under a progress bar (shown after 1 s)."""
    chunks = [list(range(len(pairs)))]
    bar = None
    if progress and len(pairs) > 32:
        from tqdm.auto import tqdm

        chunks = [list(range(s, min(s + 32, len(pairs)))) for s in range(0, len(pairs), 32)]
        bar = tqdm(total=len(pairs), desc="analyze", unit="module", delay=1.0, file=sys.stderr)
    sigmas: list[torch.Tensor] = []
    try:
        for idx in chunks:
            chunk = [pairs[i] for i in idx]
            try:
                sigmas += singular_values([p.A for p in chunk], [p.B for p in chunk], [p.scaling for p in chunk])
            except ValueError:
                for pair in chunk:  # name the module rather than its index in the batch
                    if not (bool(torch.isfinite(pair.A).all()) and bool(torch.isfinite(pair.B).all())):
                        raise ValueError(f"analyze: the adapter of {pair.name!r} contains NaN or Inf") from None
                raise
            if bar is not None:
                bar.update(len(idx))
    finally:
        if bar is not None:
            bar.close()
    return sigmas
