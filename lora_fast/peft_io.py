"""PEFT interoperability: swap PEFT's LoRA layers for ``LoraLinear``, and read/write PEFT's adapter format.

The format is ``adapter_config.json`` (a ``LoraConfig``) plus ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` and ``base_model.model.<module>.<param>`` for
``modules_to_save`` (the adapter name is not part of saved keys). Per-module ranks and alphas go to
``rank_pattern``/``alpha_pattern`` keyed by the module's full name, so PEFT rebuilds exactly our shapes.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save_file
from torch import nn

from lora_fast.injection import inject
from lora_fast.injection import lora_modules
from lora_fast.layers import LoraLinear
from lora_fast.layers import is_conv1d

__all__ = ["from_peft", "load_adapter", "save_adapter"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
# PEFT wraps a module to save as <name>.modules_to_save.<adapter> next to <name>.original_module
_SAVED_WRAPPER = re.compile(r"\.modules_to_save\.[^.]+")
# LoraConfig options that change the math or the matching and that LoraLinear does not implement
_UNSUPPORTED = ("use_dora", "lora_bias", "layers_to_transform", "layers_pattern", "exclude_modules", "use_qalora")


def _relative(name: str) -> str:
    return name.removeprefix(_PEFT_PREFIX)


def from_peft(model: nn.Module) -> nn.Module:
    """Replace every PEFT LoRA ``Linear`` (active adapter) of ``model`` by a ``LoraLinear`` in place; returns it.

    Weights, scaling, dropout and requires_grad carry over, so outputs and gradients stay the same. PEFT's own
    methods that expect its layers (``merge_and_unload``, adapter switching) no longer apply to swapped modules.

    Args:
        model: a ``PeftModel`` (or any module holding PEFT LoRA layers) with a single active, unmerged adapter.
    """
    from peft.tuners.lora import LoraLayer

    peft_layers = [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    if not peft_layers:
        raise ValueError(f"{type(model).__name__} holds no PEFT LoRA layer")
    for name, module in peft_layers:
        if len(module.active_adapters) != 1:
            raise ValueError(f"{name}: exactly one active adapter is supported, got {module.active_adapters}")
        adapter = module.active_adapters[0]
        base = module.get_base_layer()
        if adapter not in module.lora_A or not (isinstance(base, nn.Linear) or is_conv1d(base)):
            raise ValueError(f"{name}: only LoRA on nn.Linear/Conv1D converts, not {type(base).__name__}")
        if module.merged:
            raise ValueError(f"{name}: the adapter is merged; call unmerge_adapter() first")
        if module.use_dora.get(adapter, False) or module.lora_B[adapter].bias is not None:
            raise ValueError(f"{name}: DoRA and lora_bias are not supported")
        r, alpha, scaling = module.r[adapter], module.lora_alpha[adapter], module.scaling[adapter]
        dropout = module.lora_dropout[adapter]
        use_rslora = math.isclose(scaling, alpha / math.sqrt(r)) and not math.isclose(scaling, alpha / r)
        layer = LoraLinear(
            base, r, alpha, dropout=dropout.p if isinstance(dropout, nn.Dropout) else 0.0, use_rslora=use_rslora
        )
        layer.scaling = float(scaling)  # exact, also after PEFT's set_scale()
        peft_A, peft_B = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        layer.lora_A = nn.Parameter(peft_A.detach().clone(), requires_grad=peft_A.requires_grad)
        layer.lora_B = nn.Parameter(peft_B.detach().clone(), requires_grad=peft_B.requires_grad)
        layer.train(module.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    return model


def _most_common(values: list) -> object:
    return Counter(values).most_common(1)[0][0]


def _trainable_modules(model: nn.Module, lora_names: set[str]) -> list[str]:
    """Relative names of modules outside LoRA layers that own trainable parameters (PEFT's modules_to_save)."""
    names = set()
    for param_name, param in model.named_parameters():
        module_name = param_name.rpartition(".")[0]
        inside_lora = any(module_name == lora or module_name.startswith(lora + ".") for lora in lora_names)
        if param.requires_grad and not inside_lora:
            names.add(_relative(_SAVED_WRAPPER.sub("", module_name)))
    return sorted(names)


def save_adapter(
    model: nn.Module,
    save_dir: str | Path,
    modules_to_save: list[str] | None = None,
    base_model_name_or_path: str | None = None,
) -> None:
    """Write the model's LoRA adapter in PEFT's format (``PeftModel.from_pretrained`` loads it).

    Args:
        model: a model with ``LoraLinear`` layers (from ``inject`` or ``from_peft``).
        save_dir: output folder (created).
        modules_to_save: full names of extra modules whose weights are saved whole (e.g. ``["classifier"]``);
            None saves every module outside the LoRA layers that has trainable parameters.
        base_model_name_or_path: recorded in the config (defaults to ``model.config.name_or_path`` if present).
    """
    layers = {_relative(name): layer for name, layer in lora_modules(model).items()}
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoraLinear layer to save")
    if len({layer.use_rslora for layer in layers.values()}) > 1:
        raise ValueError("PEFT's format has one use_rslora flag; the model mixes rsLoRA and plain scaling")
    if modules_to_save is None:
        modules_to_save = _trainable_modules(model, set(lora_modules(model)))

    r = _most_common([layer.r for layer in layers.values()])
    alpha = _most_common([layer.lora_alpha for layer in layers.values()])
    # full-name keys: PEFT matches a key as the regex (.*\.)?(key)$, which a full name matches only for itself
    rank_pattern = {name: layer.r for name, layer in layers.items() if layer.r != r}
    alpha_pattern = {name: layer.lora_alpha for name, layer in layers.items() if layer.lora_alpha != alpha}
    name_or_path = base_model_name_or_path or getattr(getattr(model, "config", None), "name_or_path", None)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": name_or_path or None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": _most_common([layer.dropout for layer in layers.values()]),
        "target_modules": sorted(layers),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": next(iter(layers.values())).use_rslora,
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "modules_to_save": modules_to_save or None,
        "bias": "none",
        "init_lora_weights": True,
        "use_dora": False,
    }

    tensors = {}
    for name, layer in layers.items():
        tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach().contiguous()
        tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach().contiguous()
    for name in modules_to_save or []:
        module = _find_module(model, name)
        for param_name, tensor in module.state_dict().items():
            tensors[f"{_PEFT_PREFIX}{name}.{param_name}"] = tensor.detach().contiguous()

    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    (save_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(save_dir / WEIGHTS_NAME), metadata={"format": "pt"})


def _find_module(model: nn.Module, relative_name: str) -> nn.Module:
    """The module named ``relative_name`` in a plain model or in a PeftModel (prefix and save-wrapper resolved)."""
    for candidate in (relative_name, _PEFT_PREFIX + relative_name):
        try:
            module = model.get_submodule(candidate)
        except AttributeError:
            continue
        wrapped = getattr(module, "modules_to_save", None)
        if isinstance(wrapped, nn.ModuleDict) and len(wrapped) == 1:  # PEFT's ModulesToSaveWrapper
            return next(iter(wrapped.values()))
        return module
    raise ValueError(f"module {relative_name!r} not found in {type(model).__name__}")


@torch.no_grad()
def load_adapter(model: nn.Module, load_dir: str | Path) -> nn.Module:
    """Load a PEFT LoRA adapter (ours or PEFT's ``save_pretrained``) into ``model``; returns the model.

    A model without LoRA layers gets them first, through ``inject`` with the saved config (target_modules,
    r, lora_alpha, rank_pattern, alpha_pattern, use_rslora, lora_dropout, modules_to_save); a model that has them
    must match the saved shapes. Every saved tensor must find its place and every LoRA layer must be filled.

    Args:
        model: the base model (e.g. the same Hugging Face model the adapter was trained on), or one with LoRA layers.
        load_dir: folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
    """
    load_dir = Path(load_dir)
    config = json.loads((load_dir / CONFIG_NAME).read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{load_dir}: peft_type {config.get('peft_type')!r} is not LORA")
    unsupported = [key for key in _UNSUPPORTED if config.get(key)]
    if unsupported:
        raise ValueError(f"{load_dir}: LoraConfig options {unsupported} are not supported")
    modules_to_save = config.get("modules_to_save") or []
    if not lora_modules(model):
        inject(
            model,
            config["target_modules"],
            r=config["r"],
            alpha=config["lora_alpha"],
            dropout=config.get("lora_dropout", 0.0),
            rank_pattern=config.get("rank_pattern") or None,
            alpha_pattern=config.get("alpha_pattern") or None,
            use_rslora=config.get("use_rslora", False),
            modules_to_save=modules_to_save,
        )
    layers = {_relative(name): layer for name, layer in lora_modules(model).items()}
    filled: Counter[str] = Counter()
    for key, tensor in load_file(str(load_dir / WEIGHTS_NAME)).items():
        name = _relative(key)
        for factor in ("lora_A", "lora_B"):
            suffix = f".{factor}.weight"
            if name.endswith(suffix) and name.removesuffix(suffix) in layers:
                target = getattr(layers[name.removesuffix(suffix)], factor)
                filled[name.removesuffix(suffix)] += 1
                break
        else:
            module_name, _, param_name = name.rpartition(".")
            if not any(module_name == m or module_name.endswith("." + m) for m in modules_to_save):
                raise ValueError(f"{load_dir}: saved tensor {key!r} belongs to no LoRA layer or module to save")
            target = _find_module(model, module_name).get_parameter(param_name)
        if target.shape != tensor.shape:
            raise ValueError(f"{load_dir}: {key!r} has shape {tuple(tensor.shape)}, the model {tuple(target.shape)}")
        target.copy_(tensor)
    missing = sorted(name for name in layers if filled[name] != 2)
    if missing:
        raise ValueError(f"{load_dir}: no saved lora_A/lora_B for {missing}")
    return model
