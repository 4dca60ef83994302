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

import json
import math
import os
import re
import warnings
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lora_fast.injection import match_pattern
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
        }


_PEFT_PREFIX = "base_model.model."
_GENERIC_KINDS = {"dense", "proj", "linear", "fc", "out", "output", "weight"}
_LAYER_RE = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def _layer_and_kind(name: str) -> tuple[int | None, str]:
    match = _LAYER_RE.search(name)
    inner = name[match.end() :] if match and match.end() < len(name) else name
    last = inner.rsplit(".", 1)[-1]
    return (int(match.group(1)) if match else None), (inner if last in _GENERIC_KINDS else last)


def _scaling_from_config(config: Mapping[str, Any], name: str, r: int) -> float:
    alpha = match_pattern(config.get("alpha_pattern"), name, config.get("lora_alpha", r))
    return float(alpha) / (math.sqrt(r) if config.get("use_rslora") else r)


def _config_dict(config: Any) -> dict[str, Any] | None:
    if config is None or isinstance(config, Mapping):
        return None if config is None else dict(config)
    if isinstance(config, (str, os.PathLike)):
        with open(config) as f:
            return json.load(f)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return vars(config)


def _pairs_from_module(model: torch.nn.Module, adapter_name: str | None):
    pairs = []
    for name, module in model.named_modules():
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if isinstance(lora_a, torch.Tensor) and isinstance(lora_b, torch.Tensor):  # lora_fast.LoraLinear
            pairs.append((name, None, lora_a, lora_b, float(module.scaling)))
        elif isinstance(lora_a, torch.nn.ModuleDict) and isinstance(lora_b, torch.nn.ModuleDict):  # PEFT LoraLayer
            for adapter in lora_a:
                if adapter_name is not None and adapter != adapter_name:
                    continue
                a = lora_a[adapter].weight
                b = lora_b[adapter].weight
                # conv adapters: A (r, in, kh, kw) and B (out, r, 1, 1) act as r×(in·kh·kw) and out×r
                pairs.append((name, adapter, a.flatten(1), b.flatten(1), float(module.scaling[adapter])))
        elif isinstance(lora_a, torch.nn.ParameterDict) and isinstance(
            getattr(module, "lora_E", None), torch.nn.ParameterDict
        ):
            # PEFT AdaLoRA: ΔW = B (A ⊙ E) · scaling / (ranknum + 1e-5); pruned triplets have E = 0
            for adapter in lora_a:
                if adapter_name is None or adapter == adapter_name:
                    scaling = float(module.scaling[adapter]) / (float(module.ranknum[adapter]) + 1e-5)
                    pairs.append((name, adapter, lora_a[adapter] * module.lora_E[adapter], lora_b[adapter], scaling))
        emb_a, emb_b = getattr(module, "lora_embedding_A", None), getattr(module, "lora_embedding_B", None)
        if isinstance(emb_a, torch.nn.ParameterDict) and isinstance(emb_b, torch.nn.ParameterDict):
            for adapter in emb_a:  # PEFT Embedding: ΔWᵀ = B A, same singular values
                if adapter_name is None or adapter == adapter_name:
                    pairs.append((name, adapter, emb_a[adapter], emb_b[adapter], float(module.scaling[adapter])))
    return pairs


_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<emb>embedding_)?(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?$")


def _pairs_from_state_dict(state: Mapping[str, torch.Tensor], config: dict[str, Any] | None, adapter_name):
    found: dict[tuple[str, str | None], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        stem = key[: -len(".weight")] if key.endswith(".weight") else key
        match = _KEY_RE.match(stem)
        if match is None:
            continue
        adapter = match["adapter"]
        if adapter_name is not None and adapter not in (None, adapter_name):
            continue
        found.setdefault((match["module"], adapter), {})[match["ab"]] = tensor
    if config is None and found:
        warnings.warn(
            "analyze: no adapter config given, so scaling = 1.0 (sigma of B@A); energy ranks are unaffected",
            stacklevel=3,
        )
    pairs = []
    for (module, adapter), ab in found.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"analyze: {module} has lora_{next(iter(ab))} but not its partner")
        a, b = ab["A"].flatten(1), ab["B"].flatten(1)
        name = module[len(_PEFT_PREFIX) :] if module.startswith(_PEFT_PREFIX) else module
        scaling = 1.0 if config is None else _scaling_from_config(config, name, a.shape[0])
        pairs.append((module, adapter, a, b, scaling))
    return pairs


def _load_saved_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    from safetensors.torch import load_file

    path = os.fspath(path)
    folder, file = (
        (path, os.path.join(path, "adapter_model.safetensors"))
        if os.path.isdir(path)
        else (
            os.path.dirname(path),
            path,
        )
    )
    if not os.path.exists(file):
        raise ValueError(f"analyze: no adapter weights at {file}")
    config_file = os.path.join(folder, "adapter_config.json")
    config = None
    if os.path.exists(config_file):
        with open(config_file) as f:
            config = json.load(f)
    return load_file(file), config


def analyze(
    source: torch.nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike,
    threshold: float = 0.95,
    *,
    config: Mapping[str, Any] | str | os.PathLike | Any | None = None,
    adapter_name: str | None = None,
) -> list[AdapterRecord]:
    """Spectra and energy ranks of every LoRA adapter in ``source``, from one batched call.

    Args:
        source: a PEFT model, a model with lora_fast adapters, a state dict (PEFT's saved keys
            ``….lora_A.weight``, in-memory ``….lora_A.<adapter>.weight``, or lora_fast's ``….lora_A``), or a
            saved PEFT adapter (directory with ``adapter_model.safetensors``, or that file).
        threshold: energy fraction for ``energy_rank``.
        config: LoRA config (dict, ``LoraConfig`` or path to ``adapter_config.json``) giving ``lora_alpha``,
            ``use_rslora`` and ``alpha_pattern`` for state dicts; read from the adapter folder when present.
            Modules carry their own scaling and ignore it.
        adapter_name: only this PEFT adapter (default: all).

    Returns:
        One record per adapter, in model/state-dict order.
    """
    threshold = _check_threshold(threshold)
    if isinstance(source, torch.nn.Module):
        pairs = _pairs_from_module(source, adapter_name)
    elif isinstance(source, Mapping):
        pairs = _pairs_from_state_dict(source, _config_dict(config), adapter_name)
    elif isinstance(source, (str, os.PathLike)):
        state, saved_config = _load_saved_adapter(source)
        pairs = _pairs_from_state_dict(state, _config_dict(config) or saved_config, adapter_name)
    else:
        raise ValueError(f"analyze: expected a model, a state dict or an adapter path, got {type(source).__name__}")
    if not pairs:
        raise ValueError("analyze: found no LoRA adapters (no lora_A/lora_B pairs)")
    sigmas = singular_values([p[2] for p in pairs], [p[3] for p in pairs], [p[4] for p in pairs])
    ranks = energy_rank(sigmas, threshold)
    records = []
    for (module, adapter, a, b, scaling), sigma, rank in zip(pairs, sigmas, ranks, strict=True):
        name = module[len(_PEFT_PREFIX) :] if module.startswith(_PEFT_PREFIX) else module
        layer, kind = _layer_and_kind(name)
        records.append(
            AdapterRecord(
                name, layer, kind, int(a.shape[0]), (int(b.shape[0]), int(a.shape[1])), scaling, rank, sigma, adapter
            )
        )
    return records
