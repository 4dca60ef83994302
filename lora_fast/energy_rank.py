"""How much rank do LoRA adapters use? Singular values and energy ranks of ΔW = s·B·A, batched and cheap.

All functions work without forming the m×n update: QR of B and of Aᵀ, then the SVD of an r×r core, which costs
O((m+n)·r²) per adapter instead of the O(m·n·min(m,n)) of a dense SVD. The op itself, with its routing, dtype policy
and checks, is ``lora_fast.ops.lowrank_svd``; this module collects adapters and calls it.

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
from lora_fast.ops import lowrank_svd as op

__all__ = ["AdapterRecord", "analyze", "energy_rank", "singular_values", "truncate"]

TensorOrList = torch.Tensor | Sequence[torch.Tensor]


def _svdvals(a_list: list[torch.Tensor], b_list: list[torch.Tensor], scales: list[float]) -> list[torch.Tensor]:
    # the registered op under torch.compile; its eager body otherwise (the custom-op wrapper costs ~8 us per tensor)
    if torch.compiler.is_compiling():
        return op.lowrank_svdvals(a_list, b_list, scales)
    with torch.no_grad():
        return op.svdvals(a_list, b_list, scales, where="singular_values")


def singular_values(A: TensorOrList, B: TensorOrList, scaling: float | Sequence[float] | torch.Tensor = 1.0):
    """Singular values, descending, of ``scaling * B @ A`` without forming the product.

    Args:
        A: (..., r, n) tensor, or a list of such tensors (adapters of different shapes).
        B: (..., m, r) tensor with the same leading dims, or a list matching ``A``.
        scaling: a number (0-d tensors and numpy scalars included); for a batched tensor also a tensor or array
            broadcastable to the leading dims; for lists also one number per adapter. Its sign does not matter.

    Returns:
        (..., min(r, m, n)) tensor (a list of them for list input), float64 for float64 input and float32
        otherwise. Computed in float64. Not differentiable.

    Raises:
        ValueError: mismatched inner ranks or batch dims, ndim < 2, empty input, non-float dtype, NaN/Inf in the
            factors, a scaling that is not finite or not a number.
    """
    if isinstance(A, torch.Tensor) or isinstance(B, torch.Tensor):
        a, b = op.check_pair(A, B, "singular_values")
        scale = op.batch_scaling(scaling, a.shape[:-2], a.device, "singular_values")
        sigma = _svdvals([a], [b], [scale if isinstance(scale, float) else 1.0])[0]
        return sigma if isinstance(scale, float) else sigma * scale.to(sigma.dtype).unsqueeze(-1)
    if isinstance(A, (str, bytes)) or isinstance(B, (str, bytes)):
        raise ValueError("singular_values: A and B must be tensors or lists of tensors")
    A, B = list(A), list(B)
    if not A:
        raise ValueError("singular_values: empty list of adapters")
    if len(A) != len(B):
        raise ValueError(f"singular_values: {len(A)} A matrices but {len(B)} B matrices")
    return _svdvals(A, B, op.check_scalings(scaling, len(A), "singular_values"))


def _check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    return threshold


def _spectrum(value: Any, i: int) -> torch.Tensor:
    """One 1-D spectrum of a list given to energy_rank, from a tensor, an array or a list of numbers."""
    if isinstance(value, (int, float)):
        raise ValueError(
            f"energy_rank: sigma as a list must hold 1-D spectra, but element {i} is the number {value!r}; "
            "pass torch.tensor([...]) for a single spectrum"
        )
    try:
        spectrum = value if isinstance(value, torch.Tensor) else torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"energy_rank: element {i} of sigma is not a spectrum: {type(value).__name__}") from exc
    if spectrum.ndim != 1:
        raise ValueError(f"energy_rank: element {i} of sigma must be 1-D, got shape {tuple(spectrum.shape)}")
    return spectrum


def energy_rank(sigma: torch.Tensor | Sequence[torch.Tensor] | Any, threshold: float = 0.95):
    """Smallest j with ``sum(σ[:j]²) >= threshold * sum(σ²)``: the rank that holds ``threshold`` of the energy.

    The comparison is ``>=`` (as in PEFT's rank conversion), so a spectrum whose top-j values hold exactly the
    threshold gets j. An all-zero spectrum has energy rank 0. Spectra are divided by their largest value first, so
    float64 spectra anywhere in the representable range (1e±300) give the same ranks as at unit scale.

    Args:
        sigma: (..., k) singular values (any order; they are sorted) as a tensor or numpy array, or a list of 1-D
            spectra (tensors, arrays or lists of numbers).
        threshold: fraction of energy in (0, 1].

    Returns:
        int64 tensor of shape (...), or a list of ints for list input.
    """
    threshold = _check_threshold(threshold)
    if isinstance(sigma, (list, tuple)):
        spectra = [_spectrum(s, i) for i, s in enumerate(sigma)]
        if not spectra:
            raise ValueError("energy_rank: empty list of spectra")
        if len({s.device for s in spectra}) == 1:
            # zero padding changes neither the cumulative nor the total energy: one batched call for all
            padded = torch.nn.utils.rnn.pad_sequence([s.to(torch.float64) for s in spectra], batch_first=True)
            return energy_rank(padded, threshold).tolist()
        return [energy_rank(s, threshold).tolist() for s in spectra]
    if not isinstance(sigma, torch.Tensor):
        if not hasattr(sigma, "__array__"):
            raise ValueError(
                f"energy_rank: sigma must be a tensor, an array or a list of spectra, got {type(sigma).__name__}"
            )
        sigma = torch.as_tensor(sigma)
    if sigma.ndim == 0 or sigma.shape[-1] == 0:
        raise ValueError(f"energy_rank: sigma must be (..., k) with k >= 1, got shape {tuple(sigma.shape)}")
    if sigma.is_complex() or sigma.dtype == torch.bool:
        raise ValueError(f"energy_rank: sigma must be real, got {sigma.dtype}")
    sigma = sigma.to(torch.float64)
    if not bool(torch.isfinite(sigma).all()):
        raise ValueError("energy_rank: sigma contains NaN or Inf")
    if bool((sigma < 0).any()):
        raise ValueError("energy_rank: singular values must be non-negative")
    # σ/σ_max: the squares of σ beyond ~1e154 overflow and below ~1e-162 underflow; the ratios do neither
    top = sigma.amax(dim=-1, keepdim=True)
    unit = sigma / torch.where(top > 0, top, torch.ones_like(top))
    energy = unit.sort(dim=-1, descending=True).values.square().cumsum(-1)
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
    a, b = op.check_pair(A, B, "truncate")
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        raise ValueError("truncate: adapter contains NaN or Inf")
    k = min(a.shape[-2], a.shape[-1], b.shape[-2])
    # powers of two bring both factors to max |x| ~ 1 (exact), so the QR norms cannot overflow
    a_unit, ea = op.unit_scaled(a.to(torch.float64))
    b_unit, eb = op.unit_scaled(b.to(torch.float64))
    q_b, r_b = torch.linalg.qr(b_unit)  # B = Q_B R_B, Q_B (m, min(m, r))
    q_a, r_a = torch.linalg.qr(a_unit.mT)  # Aᵀ = Q_A R_A
    u, s, vh = torch.linalg.svd(r_b @ r_a.mT)  # B A = Q_B U Σ Vᵀ Q_Aᵀ
    if threshold is not None:
        rank = int(energy_rank(s[..., :k], threshold).max())
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank <= k:
        raise ValueError(f"truncate: rank must be an int in [0, {k}] (min of r, m, n), got {rank!r}")
    root = s[..., :rank].sqrt()
    half = torch.div(ea + eb, 2, rounding_mode="floor")  # 2^(ea+eb) split between the two factors
    b_new = op.times_pow2((q_b @ u[..., :, :rank]) * root.unsqueeze(-2), half)
    a_new = op.times_pow2(root.unsqueeze(-1) * (vh[..., :rank, :] @ q_a.mT), ea + eb - half)
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
