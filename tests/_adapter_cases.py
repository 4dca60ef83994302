"""Small adapters for the adapter-reading, shrink and CLI tests: a tiny random BERT and a toy conv/embedding model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_bert(seed: int = 0, **config_overrides: int) -> nn.Module:
    """A random 3-layer BERT classifier of width 32; ``config_overrides`` change ``BertConfig`` fields."""
    transformers = pytest.importorskip("transformers")
    settings = {
        "vocab_size": 100,
        "hidden_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "intermediate_size": 48,
        "num_labels": 3,
        "max_position_embeddings": 40,
    }
    config = transformers.BertConfig(**{**settings, **config_overrides})
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(config).eval()


class Toy(nn.Module):
    """An embedding, a conv and linear layers: every layer type PEFT's LoRA adapts."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 24)
        self.conv = nn.Conv2d(3, 20, 3)
        self.layers = nn.ModuleList(
            nn.ModuleDict({"lin": nn.Linear(24, 40), "out": nn.Linear(40, 24)}) for _ in range(2)
        )
        self.head = nn.Linear(24, 2)


def randomise(model: nn.Module, seed: int = 1, scale: float = 0.3) -> None:
    """Random LoRA factors (B too: PEFT's zero B would hide errors on the A side) and modules_to_save weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float64).to(param.dtype) * scale)


def peft_adapter(folder: Path, model: nn.Module | None = None, seed: int = 1, **lora_kwargs) -> nn.Module:
    """A PEFT model with random factors, saved to ``folder``; returns the model (eval mode)."""
    peft = pytest.importorskip("peft")
    config_cls = peft.AdaLoraConfig if "init_r" in lora_kwargs else peft.LoraConfig
    model = peft.get_peft_model(model if model is not None else tiny_bert(), config_cls(**lora_kwargs))
    randomise(model, seed)
    model.save_pretrained(folder)
    return model.eval()


def peft_deltas(model: nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """ΔW of every LoRA layer of a PEFT model, by module name without PEFT's prefix, in float64."""
    peft = pytest.importorskip("peft")
    deltas = {}
    for name, module in model.named_modules():
        factors = {**getattr(module, "lora_A", {}), **getattr(module, "lora_embedding_A", {})}
        if isinstance(module, peft.tuners.tuners_utils.BaseTunerLayer) and adapter in factors:
            deltas[name.removeprefix("base_model.model.")] = module.get_delta_weight(adapter).detach().double()
    return deltas


def best_rank(delta: torch.Tensor, j: int) -> torch.Tensor:
    """The float64 Eckart–Young truncation of a (possibly conv) ΔW, reshaped back."""
    flat = delta.reshape(delta.shape[0], -1)
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    return ((u[:, :j] * s[:j]) @ vh[:j]).reshape(delta.shape)


def sigma_of(delta: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(delta.reshape(delta.shape[0], -1).double())
