"""PEFT interoperability: swap PEFT's LoRA layers for ``LoraLinear``, and read/write PEFT's adapter format.

The format is ``adapter_config.json`` (a ``LoraConfig``) plus ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` and ``base_model.model.<module>.<param>`` for
``modules_to_save`` (the adapter name is not part of saved keys). Per-module ranks and alphas go to
``rank_pattern``/``alpha_pattern`` keyed by the module's full name, so PEFT rebuilds exactly our shapes. The naming,
matching and scaling rules come from ``lora_fast.peft_rules``.

Writes are atomic (``staged_folder``): both files go to a temporary folder beside the target, which then takes the
target's place in one rename, so a failure or a kill leaves the old adapter whole. Loads are transactional: a
failed ``load_adapter`` leaves the model as it was.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lora_fast.adapters import AdapterError
from lora_fast.adapters import load_tensors
from lora_fast.adapters import read_settings
from lora_fast.injection import _inject
from lora_fast.injection import _restore
from lora_fast.injection import lora_modules
from lora_fast.layers import LoraLinear
from lora_fast.layers import is_conv1d
from lora_fast.peft_rules import PEFT_PREFIX
from lora_fast.peft_rules import lora_scaling
from lora_fast.peft_rules import matches_saved_entry
from lora_fast.peft_rules import most_common
from lora_fast.peft_rules import pattern_from_values
from lora_fast.peft_rules import strip_prefix

__all__ = ["from_peft", "load_adapter", "save_adapter", "staged_folder"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# PEFT wraps a module to save as <name>.modules_to_save.<adapter> next to <name>.original_module
_SAVED_WRAPPER = re.compile(r"\.modules_to_save\.[^.]+")
# LoraConfig options that change the math or the matching and that LoraLinear does not implement
_UNSUPPORTED = ("use_dora", "lora_bias", "layers_to_transform", "layers_pattern", "exclude_modules", "use_qalora")


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
    for name, module in peft_layers:  # check every layer before swapping any
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
    for name, module in peft_layers:
        adapter = module.active_adapters[0]
        r, alpha, scaling = module.r[adapter], module.lora_alpha[adapter], module.scaling[adapter]
        dropout = module.lora_dropout[adapter]
        use_rslora = bool(getattr(module, "use_rslora", {}).get(adapter, False))
        layer = LoraLinear(
            module.get_base_layer(),
            r,
            alpha,
            dropout=dropout.p if isinstance(dropout, nn.Dropout) else 0.0,
            use_rslora=use_rslora,
        )
        if not math.isclose(scaling, lora_scaling(alpha, r, use_rslora)):
            layer.scaling = float(scaling)  # PEFT's set_scale() changed it: keep it exact
        peft_A, peft_B = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        layer.lora_A = nn.Parameter(peft_A.detach().clone(), requires_grad=peft_A.requires_grad)
        layer.lora_B = nn.Parameter(peft_B.detach().clone(), requires_grad=peft_B.requires_grad)
        layer.train(module.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    return model


# ---- atomic folder writes --------------------------------------------------------------------------------------

_TEMP_TAG = ".lora-fast-tmp-"
_RENAME_EXCHANGE = 2  # renameat2 flag: swap two paths atomically (Linux >= 3.15, ext4/xfs/btrfs/tmpfs)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step; False where the system cannot (then the caller renames in two)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _link_tree(source: Path, dest: Path, skip: set[str]) -> None:
    """Hard-link (or copy) everything under ``source`` into ``dest`` except the top-level names in ``skip``."""
    for entry in source.iterdir():
        if entry.name in skip:
            continue
        target = dest / entry.name
        if entry.is_dir() and not entry.is_symlink():
            target.mkdir()
            shutil.copymode(entry, target)
            _link_tree(entry, target, set())
        elif entry.is_symlink():
            target.symlink_to(os.readlink(entry))
        else:
            try:
                os.link(entry, target)
            except OSError:
                shutil.copy2(entry, target)


def _remove_stale_temps(target: Path) -> None:
    """Temporary folders of earlier writes to ``target`` whose process is gone (a kill mid-write leaves one)."""
    prefix = f".{target.name}{_TEMP_TAG}"
    for entry in target.parent.glob(f"{_glob_escape(prefix)}*"):
        pid = entry.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(entry, ignore_errors=True)


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


@contextlib.contextmanager
def staged_folder(target: str | Path, *, replace: bool, keep_other_files: bool = True) -> Iterator[Path]:
    """A temporary folder to write a new version of ``target`` into; on a clean exit it takes ``target``'s place.

    The temporary folder sits beside ``target`` (same file system, named ``.<name>.lora-fast-tmp-<pid>-…``), so the
    switch is one rename: an atomic exchange on Linux, else two renames. Until then ``target`` is untouched; an
    exception removes the temporary folder and re-raises; a kill leaves it beside (never inside) ``target``, and the
    next write to ``target`` removes it. Not synced to disk: atomic against crashes of the process, not of the power.

    Args:
        target: the folder to create or replace.
        replace: allow replacing an existing ``target``; otherwise it raises ``FileExistsError``.
        keep_other_files: carry the files of the old ``target`` that were not written anew (hard links).

    Raises:
        FileExistsError: ``target`` exists and ``replace`` is False, or it is not a folder.
        PermissionError: ``target`` or its parent is not writable.
    """
    target = Path(target).absolute()
    exists = target.exists() or target.is_symlink()
    if exists and not target.is_dir():
        raise FileExistsError(f"{target}: exists and is not a folder")
    if exists and not replace:
        raise FileExistsError(f"{target}: exists (choose another folder, or allow replacing it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    if exists and not os.access(target, os.W_OK | os.X_OK):
        raise PermissionError(f"{target}: folder is not writable; nothing was written")
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{target.parent}: folder is not writable; nothing was written")
    _remove_stale_temps(target)
    temp = Path(tempfile.mkdtemp(prefix=f".{target.name}{_TEMP_TAG}{os.getpid()}-", dir=target.parent))
    try:
        if exists:
            shutil.copymode(target, temp)
        else:
            umask = os.umask(0)
            os.umask(umask)
            temp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; a new folder should look like one made by mkdir
        yield temp
        if exists and keep_other_files:
            _link_tree(target, temp, {p.name for p in temp.iterdir()})
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    if not exists:
        temp.rename(target)
    elif _exchange(temp, target):
        shutil.rmtree(temp, ignore_errors=True)  # it now holds the old version
    else:
        old = temp.with_name(temp.name + "-old")
        target.rename(old)
        temp.rename(target)
        shutil.rmtree(old, ignore_errors=True)


def write_adapter_folder(
    folder: str | Path,
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    *,
    replace: bool,
    keep_other_files: bool = True,
) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``folder`` atomically (``staged_folder``).

    Args:
        folder: the adapter folder.
        config: the config dict.
        tensors: the weights, keys as PEFT saves them.
        replace: replace an existing folder.
        keep_other_files: keep the old folder's other files (a model card, checkpoints, …).
    """
    with staged_folder(folder, replace=replace, keep_other_files=keep_other_files) as temp:
        (temp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(temp / WEIGHTS_NAME), metadata={"format": "pt"})


# ---- save ------------------------------------------------------------------------------------------------------


def _trainable_modules(model: nn.Module, lora_names: set[str]) -> list[str]:
    """Relative names of modules outside LoRA layers that own trainable parameters (PEFT's modules_to_save)."""
    names = set()
    for param_name, param in model.named_parameters():
        module_name = param_name.rpartition(".")[0]
        inside_lora = any(module_name == lora or module_name.startswith(lora + ".") for lora in lora_names)
        if param.requires_grad and not inside_lora:
            names.add(strip_prefix(_SAVED_WRAPPER.sub("", module_name)))
    return sorted(names)


def save_adapter(
    model: nn.Module,
    save_dir: str | Path,
    modules_to_save: list[str] | None = None,
    base_model_name_or_path: str | None = None,
) -> None:
    """Write the model's LoRA adapter in PEFT's format (``PeftModel.from_pretrained`` loads it), atomically.

    Both files are written to a temporary folder beside ``save_dir`` which then replaces it in one rename: a failure
    or a kill part-way leaves the previous adapter in ``save_dir`` whole. Other files in ``save_dir`` are kept.

    Args:
        model: a model with ``LoraLinear`` layers (from ``inject`` or ``from_peft``).
        save_dir: output folder (created, or replaced).
        modules_to_save: full names of extra modules whose weights are saved whole (e.g. ``["classifier"]``);
            None saves every module outside the LoRA layers that has trainable parameters.
        base_model_name_or_path: recorded in the config (defaults to ``model.config.name_or_path`` if present).
    """
    layers = {strip_prefix(name): layer for name, layer in lora_modules(model).items()}
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoraLinear layer to save")
    if len({layer.use_rslora for layer in layers.values()}) > 1:
        raise ValueError("PEFT's format has one use_rslora flag; the model mixes rsLoRA and plain scaling")
    if isinstance(modules_to_save, str):
        modules_to_save = [modules_to_save]
    if modules_to_save is None:
        modules_to_save = _trainable_modules(model, set(lora_modules(model)))

    ranks = {name: layer.r for name, layer in layers.items()}
    alphas = {name: layer.lora_alpha for name, layer in layers.items()}
    r, alpha = most_common(ranks.values()), most_common(alphas.values())
    name_or_path = base_model_name_or_path or getattr(getattr(model, "config", None), "name_or_path", None)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": name_or_path or None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": most_common(layer.dropout for layer in layers.values()),
        "target_modules": sorted(layers),
        "rank_pattern": pattern_from_values(ranks, r),
        "alpha_pattern": pattern_from_values(alphas, alpha),
        "use_rslora": next(iter(layers.values())).use_rslora,
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "modules_to_save": modules_to_save or None,
        "bias": "none",
        "init_lora_weights": True,
        "use_dora": False,
    }

    tensors = {}
    for name, layer in layers.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach().contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach().contiguous()
    for name in modules_to_save or []:
        module = _find_module(model, name)
        for param_name, tensor in module.state_dict().items():
            tensors[f"{PEFT_PREFIX}{name}.{param_name}"] = tensor.detach().contiguous()
    write_adapter_folder(save_dir, config, tensors, replace=True)


def _find_module(model: nn.Module, relative_name: str) -> nn.Module:
    """The module named ``relative_name`` in a plain model or in a PeftModel (prefix and save-wrapper resolved)."""
    for candidate in (relative_name, PEFT_PREFIX + relative_name):
        try:
            module = model.get_submodule(candidate)
        except AttributeError:
            continue
        wrapped = getattr(module, "modules_to_save", None)
        if isinstance(wrapped, nn.ModuleDict) and len(wrapped) == 1:  # PEFT's ModulesToSaveWrapper
            return next(iter(wrapped.values()))
        return module
    raise ValueError(f"module {relative_name!r} not found in {type(model).__name__}")


# ---- load ------------------------------------------------------------------------------------------------------


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        raise AdapterError(f"{path}: is a directory, expected the adapter's weights file")
    if not path.exists():
        raise AdapterError(f"{path}: no such file")
    return load_tensors(path)


@torch.no_grad()
def load_adapter(model: nn.Module, load_dir: str | Path) -> nn.Module:
    """Load a PEFT LoRA adapter (ours or PEFT's ``save_pretrained``) into ``model``; returns the model.

    A model without LoRA layers gets them first, through ``inject`` with the saved config (target_modules,
    r, lora_alpha, rank_pattern, alpha_pattern, use_rslora, lora_dropout, modules_to_save; a config without
    target_modules adapts the modules the weights name); a model that has them must match the saved shapes. Every
    saved tensor must find its place and every LoRA layer must be filled. On any error the model is left as it was.

    Args:
        model: the base model (e.g. the same Hugging Face model the adapter was trained on), or one with LoRA layers.
        load_dir: folder with ``adapter_config.json`` and ``adapter_model.safetensors``.

    Raises:
        ValueError: a bad config field or weights file (named), or weights that do not fit the model.
    """
    load_dir = Path(load_dir)
    config_path = load_dir / CONFIG_NAME
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path}: no such file")
    settings = read_settings(config_path)
    if settings.is_adalora:
        raise ValueError(f"{config_path}: peft_type ADALORA is not supported; lora-fast shrink converts it to LoRA")
    unsupported = [key for key in _UNSUPPORTED if settings.raw.get(key)]
    if unsupported:
        raise ValueError(f"{config_path}: LoraConfig options {unsupported} are not supported")
    state = _read_weights(load_dir / WEIGHTS_NAME)
    modules_to_save = settings.modules_to_save or []
    lora_keys = {}  # relative module name -> {"lora_A": tensor, "lora_B": tensor}
    saved = {}  # relative parameter name -> tensor
    for key, tensor in state.items():
        name = strip_prefix(key)
        factor = next((f for f in ("lora_A", "lora_B") if name.endswith(f".{f}.weight")), None)
        if factor is not None:
            lora_keys.setdefault(name.removesuffix(f".{factor}.weight"), {})[factor] = (key, tensor)
        else:
            saved[name] = (key, tensor)

    injected: dict[str, nn.Module] = {}
    grads = {p: p.requires_grad for p in model.parameters()}
    try:
        if not lora_modules(model):
            targets = settings.target_modules if settings.target_modules is not None else sorted(lora_keys)
            injected = _inject(
                model,
                targets,
                r=settings.r,
                alpha=settings.lora_alpha,
                dropout=settings.lora_dropout,
                rank_pattern=settings.rank_pattern or None,
                alpha_pattern=settings.alpha_pattern or None,
                use_rslora=settings.use_rslora,
                modules_to_save=modules_to_save,
                unmatched_patterns="warn",  # PEFT ignores such keys; a saved adapter must still load
            )
        _fill(model, load_dir, lora_keys, saved, modules_to_save)
    except BaseException:
        _restore(model, injected, grads)
        raise
    return model


def _fill(model: nn.Module, load_dir: Path, lora_keys: dict, saved: dict, modules_to_save: list[str]) -> None:
    """Check every saved tensor against its place in ``model``, then copy them all (nothing is copied on error)."""
    layers = {strip_prefix(name): layer for name, layer in lora_modules(model).items()}
    copies: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    for name, factors in lora_keys.items():
        if name not in layers:
            key = next(iter(factors.values()))[0]
            raise ValueError(f"{load_dir}: saved tensor {key!r} belongs to no LoRA layer of the model")
        for factor, (key, tensor) in factors.items():
            copies.append((key, getattr(layers[name], factor), tensor))
    for name, (key, tensor) in saved.items():
        module_name, _, param_name = name.rpartition(".")
        if not any(matches_saved_entry(module_name, m) for m in modules_to_save):
            raise ValueError(f"{load_dir}: saved tensor {key!r} belongs to no LoRA layer or module to save")
        module = _find_module(model, module_name)
        target = dict(module.named_parameters()).get(param_name)
        if target is None:
            target = dict(module.named_buffers()).get(param_name)
        if target is None:
            raise ValueError(f"{load_dir}: saved tensor {key!r}: {module_name!r} has no parameter {param_name!r}")
        copies.append((key, target, tensor))
    for key, target, tensor in copies:
        if target.shape != tensor.shape:
            raise ValueError(f"{load_dir}: {key!r} has shape {tuple(tensor.shape)}, the model {tuple(target.shape)}")
    missing = sorted(name for name in layers if set(lora_keys.get(name, ())) != {"lora_A", "lora_B"})
    if missing:
        raise ValueError(f"{load_dir}: no saved lora_A/lora_B for {missing}")
    for _, target, tensor in copies:
        target.copy_(tensor)
