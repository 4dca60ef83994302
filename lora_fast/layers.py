"""``LoraLinear``: a frozen linear layer plus a trainable low-rank update, computed by ``lora_fast::lora_linear``."""

from __future__ import annotations

import math
import weakref

import torch
from torch import Tensor
from torch import nn

from lora_fast.ops.lora_linear import autocast_dtype
from lora_fast.ops.lora_linear import lora_linear
from lora_fast.peft_rules import lora_scaling

__all__ = ["LoraLinear", "as_linear", "is_conv1d"]


def is_conv1d(module: nn.Module) -> bool:
    """True for GPT-2 style ``Conv1D`` (weight stored (in, out), y = x W + b), recognised without importing it."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def as_linear(module: nn.Module) -> nn.Linear:
    """The layer itself if it is an ``nn.Linear``; a ``Conv1D`` becomes an equivalent ``nn.Linear`` (W transposed).

    Args:
        module: an ``nn.Linear`` or a transformers ``Conv1D``.
    """
    if isinstance(module, nn.Linear):
        return module
    if is_conv1d(module):
        in_features, out_features = module.weight.shape
        weight = module.weight.detach()
        linear = nn.Linear(in_features, out_features, bias=module.bias is not None, device=weight.device)
        linear.to(weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight.t())
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        linear.weight.requires_grad_(module.weight.requires_grad)
        if module.bias is not None:
            linear.bias.requires_grad_(module.bias.requires_grad)
        return linear
    raise ValueError(f"LoRA supports nn.Linear and transformers Conv1D layers, not {type(module).__name__}")


class LoraLinear(nn.Module):
    """``y = base_layer(x) + scaling · dropout(x) lora_Aᵀ lora_Bᵀ`` with the base layer frozen.

    ``lora_A`` (r, k) is Kaiming-uniform (a=√5) and ``lora_B`` (n, r) zeros, as in PEFT, so the layer starts as the
    base layer. A ``Conv1D`` base is stored as the equivalent ``nn.Linear`` (its weight transposed once).

    Precision follows ``nn.Linear``: under ``torch.autocast`` the layer computes in the autocast dtype; otherwise in
    x's dtype. The factors stay in their own dtype (fp32 on a bf16/fp16 base) and get gradients in it.

    Args:
        base_layer: the ``nn.Linear`` or ``Conv1D`` to adapt; its parameters are frozen.
        r: rank, >= 1.
        lora_alpha: alpha; ``scaling = alpha / r`` (or ``alpha / sqrt(r)`` with ``use_rslora``).
        dropout: dropout probability on the LoRA branch's input during training.
        use_rslora: rank-stabilised scaling.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        lora_alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"LoRA rank must be a positive int, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        # remembered so that a saved PEFT config says fan_in_fan_out for GPT-2 style models, as PEFT's own does
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.base_layer = as_linear(base_layer)
        self.base_layer.requires_grad_(False)
        weight = self.base_layer.weight
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.r = r
        self.lora_alpha = float(lora_alpha)
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(self.lora_alpha, r, use_rslora)
        self.dropout = float(dropout)
        self.merged = False
        # half-precision bases get fp32 factors, the master weights AdamW updates (PEFT's autocast_adapter_dtype)
        factor_dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=factor_dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=factor_dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self._cast_cache: tuple | None = None  # (key, weakref to the weight, cast weight, cast bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base_layer(x)
        lora_A, lora_B = self.lora_A, self.lora_B
        compute_dtype = autocast_dtype(x.device.type)
        if compute_dtype is None or x.dtype == torch.float64:  # autocast leaves float64 alone, as nn.Linear does
            compute_dtype = x.dtype
            if lora_A.dtype != x.dtype:  # e.g. fp32 adapters on a bf16 model: cast the small factors, not x
                lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)
        # under autocast the op casts the factors itself (differentiably: fp32 master weights get fp32 gradients)
        weight, bias = self._base_params(compute_dtype)
        dropout_p = self.dropout if self.training else 0.0
        return lora_linear(x, weight, bias, lora_A, lora_B, self.scaling, dropout_p)

    def _base_params(self, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
        """The base weight and bias in ``dtype``; a frozen base is cast once and reused until it changes.

        autocast casts a weight that does not require grad again at every call (its cast cache holds only leaves
        that require grad): one pass over every adapted weight per step (10-27 µs per 384×384 fp32 → bf16 cast on
        this 2-core CPU, 18 of them in a MiniLM q/k/v step). The copy costs dtype-size × n × k of memory per layer.
        """
        weight, bias = self.base_layer.weight, self.base_layer.bias
        if weight.dtype == dtype and (bias is None or bias.dtype == dtype):
            return weight, bias
        frozen = not (weight.requires_grad or (bias is not None and bias.requires_grad))
        # not under torch.compile (it traces the cast instead) nor inference_mode (its tensors cannot enter autograd)
        if not frozen or torch.compiler.is_compiling() or torch.is_inference_mode_enabled():
            return weight.to(dtype), bias.to(dtype) if bias is not None else None
        key = (dtype, weight.data_ptr(), weight._version)
        if bias is not None:
            key += (bias.data_ptr(), bias._version)
        cache = self._cast_cache
        if cache is None or cache[0] != key or cache[1]() is not weight:
            cast_bias = bias.to(dtype) if bias is not None else None
            cache = self._cast_cache = (key, weakref.ref(weight), weight.to(dtype), cast_bias)
        return cache[2], cache[3]

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """``scaling · B A`` (n, k) in fp32."""
        return self.lora_B.float() @ self.lora_A.float() * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (W += s B A); forward then costs one plain linear."""
        if self.merged:
            return
        weight = self.base_layer.weight
        # sum in fp32 so a bf16 weight is rounded once, not once for the delta and once for the sum
        weight.copy_(weight.float() + self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge`` (W -= s B A)."""
        if not self.merged:
            return
        weight = self.base_layer.weight
        weight.copy_(weight.float() - self.delta_weight())
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"lora_alpha={self.lora_alpha:g}, scaling={self.scaling:g}, dropout={self.dropout:g}, merged={self.merged}"
        )
