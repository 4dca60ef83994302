"""Every LoRA pair in a model, a state dict or a saved adapter, with the scaling PEFT would apply: one reader.

Formats read:

- PEFT adapter folders (``adapter_config.json`` + ``adapter_model.safetensors`` or ``.bin``), named adapters in
  sub-folders (``save_pretrained`` of a model with several adapters), a weights file on its own plus a config or an
  alpha. LoRA on linear, conv (kernels flattened to ``r × in·kh·kw``) and embedding layers; rsLoRA,
  ``rank_pattern``/``alpha_pattern``; AdaLoRA (``ΔW = B (A ⊙ E) · alpha / (r + 1e-5)``); DoRA (the low-rank part
  s·B·A is read and the pair is flagged: its magnitude vector is not part of it).
- In-memory state dicts (keys ``….lora_A.<adapter>.weight``) and models: PEFT layers, ``lora_fast.LoraLinear``, or
  any module with ``lora_A``/``lora_B`` tensors and a ``scaling``.
- kohya-ss files (``<name>.lora_down.weight``, ``<name>.lora_up.weight``, ``<name>.alpha``; scale alpha / r, and 1
  without alpha).

Bad input raises ``AdapterError`` (a ``ValueError``) naming the file and the key or config field.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import torch

from lora_fast.peft_rules import ConfigError
from lora_fast.peft_rules import LoraSettings
from lora_fast.peft_rules import adalora_scaling
from lora_fast.peft_rules import layer_and_kind
from lora_fast.peft_rules import lora_scaling
from lora_fast.peft_rules import pattern_key
from lora_fast.peft_rules import strip_prefix

__all__ = [
    "Adapter",
    "AdapterError",
    "LoraPair",
    "find_pairs",
    "is_lora_key",
    "load_tensors",
    "read_adapter",
    "read_settings",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")

# PEFT keys: saved ``m.lora_A.weight`` (AdaLoRA and embeddings without ``.weight``), in memory ``m.lora_A.<name>…``
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<emb>embedding_)?(?P<ab>[ABE])(?:\.(?P<adapter>[^.]+))?$")
_MAGNITUDE_KEY = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(?:\.(?P<adapter>[^.]+))?$")
# kohya-ss (and diffusers' older ``lora.down``) keys
_KOHYA_KEY = re.compile(r"^(?P<module>.+)\.lora[._](?P<ab>down|up)\.weight$")
_LYCORIS_MARKERS = ("hada_w1", "lokr_w1", "lokr_w2", ".oft_", "ia3_l")


def is_lora_key(key: str) -> bool:
    """True for a key of a LoRA factor (PEFT lora_A/B/E, embedding factors, DoRA magnitude; kohya lora_down/up)."""
    if key.endswith(".bias") or key.endswith(".alpha"):
        return False
    stem = key.removesuffix(".weight")
    return bool(_PEFT_KEY.match(stem) or _MAGNITUDE_KEY.match(stem) or _KOHYA_KEY.match(key))


class AdapterError(ValueError):
    """An adapter file, folder or state dict that cannot be read as LoRA; the message names the file and key."""


@dataclass
class LoraPair:
    """One LoRA update ΔW = scaling · B · A.

    Attributes:
        name: module name in the base model (PEFT prefix dropped); for kohya files, the kohya module name.
        A: (r, n) factor; conv kernels flattened to (r, in·kh·kw); embeddings (r, num_embeddings).
        B: (m, r) factor.
        scaling: s in ΔW = s·B·A (1.0 when no alpha was known).
        adapter: PEFT adapter name, when the source has several.
        layout: ``"linear"``, ``"conv"`` or ``"embedding"`` (ΔWᵀ = s·B·A for PEFT embeddings: same spectrum).
        keys: (A key, B key) in the state dict it came from, None for modules.
        shapes: the factors' stored shapes (conv kernels), to write truncated factors back in the same layout.
        dora: DoRA: the layer's weight is renormalised by a magnitude vector, which ΔW here does not include.
        adalora: AdaLoRA: A is ``lora_A ⊙ lora_E``.
        sep: name component separator (``"_"`` for kohya names), for ``layer_and_kind``.
    """

    name: str
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    adapter: str | None = None
    layout: str = "linear"
    keys: tuple[str, str] | None = None
    shapes: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    dora: bool = False
    adalora: bool = False
    sep: str = "."

    @property
    def r(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(m, n) of the (flattened) update."""
        return int(self.B.shape[0]), int(self.A.shape[1])

    def layer_and_kind(self) -> tuple[int | None, str]:
        return layer_and_kind(self.name, self.sep)


@dataclass
class Adapter:
    """A saved adapter: its LoRA pairs, every tensor of its weights file, and its config.

    Attributes:
        path: the weights file.
        format: ``"peft"`` or ``"kohya"``.
        pairs: the LoRA pairs, in file order.
        tensors: every tensor of the file (memory-mapped where the format allows).
        settings: the parsed LoRA config, None when there was none.
        config_path: where the config came from, if a file.
        adapter_name: the named adapter chosen, if any.
    """

    path: Path
    format: str
    pairs: list[LoraPair]
    tensors: dict[str, torch.Tensor]
    settings: LoraSettings | None = None
    config_path: Path | None = None
    adapter_name: str | None = None
    pair_keys: set[str] = field(default_factory=set)

    @property
    def dora(self) -> bool:
        return any(p.dora for p in self.pairs)

    def other_keys(self) -> list[str]:
        """Keys that are not LoRA factors (modules_to_save weights, lora_B biases, magnitude vectors, …)."""
        return [key for key in self.tensors if key not in self.pair_keys]


# ---- config ----------------------------------------------------------------------------------------------------


def read_settings(config: Any, where: str = "config") -> LoraSettings | None:
    """A ``LoraSettings`` from a dict, a PEFT ``LoraConfig``, ``LoraSettings`` or a path to ``adapter_config.json``.

    Raises:
        AdapterError: unreadable file, invalid JSON or a bad field (file and field named).
    """
    if config is None or isinstance(config, LoraSettings):
        return config
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        try:
            text = path.read_text()
        except IsADirectoryError:
            raise AdapterError(f"{path}: is a directory, expected an adapter_config.json file") from None
        except OSError as exc:
            raise AdapterError(f"{path}: cannot read the config ({exc.strerror or exc})") from None
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise AdapterError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
        where = str(path)
    elif isinstance(config, Mapping):
        raw = dict(config)
    elif hasattr(config, "to_dict"):
        raw = config.to_dict()
        raw["peft_type"] = str(getattr(raw.get("peft_type"), "value", raw.get("peft_type")) or "LORA")
    else:
        raw = config
    try:
        return LoraSettings.from_dict(raw, where)
    except ConfigError as exc:
        raise AdapterError(str(exc)) from None


# ---- files -----------------------------------------------------------------------------------------------------


def _named_adapters(folder: Path) -> list[str]:
    return sorted(
        child.name
        for child in folder.iterdir()
        if child.is_dir() and any((child / name).is_file() for name in WEIGHTS_NAMES)
    )


def _resolve(path: Path, adapter_name: str | None) -> tuple[Path, Path, bool]:
    """(weights file, folder whose adapter_config.json applies, whether ``adapter_name`` picked a sub-folder)."""
    if not path.exists():
        raise AdapterError(f"{path}: no such file or folder")
    if path.is_dir():
        in_subfolder = adapter_name is not None and (path / adapter_name).is_dir()
        if in_subfolder:
            path = path / adapter_name
        for name in WEIGHTS_NAMES:
            weights = path / name
            if weights.is_dir():
                raise AdapterError(f"{weights}: is a directory, expected the adapter's weights file")
            if weights.is_file():
                return weights, path, in_subfolder
        named = _named_adapters(path)
        hint = f"; it holds the named adapters {', '.join(named)}: pick one by name" if named else ""
        raise AdapterError(f"{path}: no adapter weights ({' or '.join(WEIGHTS_NAMES)}){hint}")
    return path, path.parent, False


def load_tensors(file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a ``.safetensors`` (memory-mapped) or ``.bin``/``.pt`` file; ``AdapterError`` names the file."""
    if file.stat().st_size == 0:
        raise AdapterError(f"{file}: empty file")
    if file.suffix == ".bin" or file.suffix == ".pt":
        try:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
                state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises pickle/zip/runtime errors of many kinds for a damaged file
            raise AdapterError(f"{file}: not a readable PyTorch weights file ({type(exc).__name__}: {exc})") from None
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise AdapterError(f"{file}: expected a dict of tensors, got {type(state).__name__}")
        return dict(state)
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except Exception as exc:  # SafetensorError (header), OSError (device, permissions), …: name the file
        raise AdapterError(f"{file}: not a readable safetensors file ({exc})") from None


def read_adapter(
    path: str | os.PathLike,
    *,
    adapter_name: str | None = None,
    config: Any = None,
    alpha: float | None = None,
) -> Adapter:
    """Read a saved adapter: a PEFT folder (or a named adapter inside it), a weights file, or a kohya file.

    Args:
        path: folder with ``adapter_model.safetensors``/``.bin``, or a ``.safetensors``/``.bin`` file.
        adapter_name: a named adapter: a sub-folder of ``path`` (PEFT's layout), or the name in in-memory keys.
        config: LoRA config overriding the folder's ``adapter_config.json`` (dict, ``LoraConfig`` or path).
        alpha: alpha for a weights file without any config (scaling alpha / r).

    Raises:
        AdapterError: missing or damaged files, bad config fields, no LoRA pairs, shapes that do not fit.
    """
    file, folder, in_subfolder = _resolve(Path(path), adapter_name)
    config_path = None
    if config is None and (folder / CONFIG_NAME).exists():
        config_path = folder / CONFIG_NAME
        if config_path.is_dir():
            raise AdapterError(f"{config_path}: is a directory, expected a JSON file")
        config = config_path
    elif isinstance(config, (str, os.PathLike)):
        config_path = Path(config)
    settings = read_settings(config)
    if settings is not None and alpha is not None:
        warnings.warn(f"alpha={alpha:g} ignored: {config_path or 'the given config'} sets the scaling", stacklevel=2)
    tensors = load_tensors(file)
    fmt = "kohya" if any(_KOHYA_KEY.match(k) for k in tensors) else "peft"
    in_file_name = None if in_subfolder else adapter_name
    if fmt == "kohya":
        pairs = _kohya_pairs(tensors, file)
    else:
        pairs = pairs_from_state_dict(tensors, settings, in_file_name, alpha=alpha, where=str(file))
    if not pairs:
        raise AdapterError(f"{file}: found no LoRA pairs (no lora_A/lora_B or lora_down/lora_up keys)")
    if adapter_name not in (None, "default") and not in_subfolder and all(p.adapter is None for p in pairs):
        named = _named_adapters(folder) if Path(path).is_dir() else []
        raise AdapterError(
            f"{path}: no adapter named {adapter_name!r}" + (f" (named adapters: {', '.join(named)})" if named else "")
        )
    keys = {k for p in pairs if p.keys for k in p.keys}
    keys |= {p.keys[0].replace(".lora_A", ".lora_E", 1) for p in pairs if p.adalora and p.keys}
    return Adapter(file, fmt, pairs, tensors, settings, config_path, adapter_name, keys)


# ---- state dicts -----------------------------------------------------------------------------------------------


def _factor(tensor: Any, key: str, where: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise AdapterError(f"{where}: {key} is a {type(tensor).__name__}, not a tensor")
    if not tensor.is_floating_point():
        raise AdapterError(f"{where}: {key} has dtype {tensor.dtype}; LoRA factors must be floating point")
    if tensor.ndim < 2 or tensor.ndim > 5:
        raise AdapterError(
            f"{where}: {key} has shape {tuple(tensor.shape)}; a LoRA factor must be 2-D (r × in, out × r) "
            "or a conv kernel (3-D to 5-D)"
        )
    if tensor.numel() == 0:
        raise AdapterError(f"{where}: {key} is empty, shape {tuple(tensor.shape)}")
    return tensor


def _flatten_pair(a: torch.Tensor, b: torch.Tensor, keys: tuple[str, str], where: str):
    """(A (r, n), B (m, r), layout) from stored factors, checking that they form one update."""
    if a.ndim != b.ndim or (b.ndim > 2 and any(d != 1 for d in b.shape[2:])):
        raise AdapterError(
            f"{where}: {keys[0]} {tuple(a.shape)} and {keys[1]} {tuple(b.shape)} do not form a LoRA pair "
            "(linear: (r, in) and (out, r); conv: (r, in, k…) and (out, r, 1…))"
        )
    a2, b2 = (a, b) if a.ndim == 2 else (a.flatten(1), b.flatten(1))
    if a2.shape[0] != b2.shape[1]:
        raise AdapterError(
            f"{where}: inner ranks differ: {keys[0]} has shape {tuple(a.shape)} (r={a.shape[0]}), "
            f"{keys[1]} has shape {tuple(b.shape)} (r={b.shape[1]})"
        )
    return a2, b2, "linear" if a.ndim == 2 else "conv"


def pairs_from_state_dict(
    state: Mapping[str, Any],
    settings: LoraSettings | None,
    adapter_name: str | None = None,
    *,
    alpha: float | None = None,
    where: str = "state dict",
) -> list[LoraPair]:
    """LoRA pairs of a PEFT-format state dict (saved or in-memory keys), scaled by ``settings`` or ``alpha``.

    Args:
        state: key -> tensor.
        settings: the adapter's config; None falls back to ``alpha`` (scaling alpha / r), else scaling 1 with a
            warning (energy ranks do not depend on it).
        adapter_name: only this adapter of in-memory keys (default: all).
        alpha: alpha for a state dict without config.
        where: the file, for error messages.
    """
    found: dict[tuple[str, str | None], dict[str, tuple[str, Any]]] = {}
    magnitudes: set[tuple[str, str | None]] = set()
    for key, tensor in state.items():
        if any(marker in key for marker in _LYCORIS_MARKERS):
            raise AdapterError(f"{where}: {key} is a LyCORIS (LoHa/LoKr/OFT/IA3) weight, not a LoRA factor")
        if key.endswith(".bias"):
            continue  # lora_B biases and modules_to_save biases are no factors
        stem = key.removesuffix(".weight")
        match = _MAGNITUDE_KEY.match(stem)
        if match is not None:
            magnitudes.add((match["module"], match["adapter"]))
            continue
        match = _PEFT_KEY.match(stem)
        if match is None:
            continue
        adapter = match["adapter"]
        if adapter_name is not None and adapter not in (None, adapter_name):
            continue
        slot = ("emb_" if match["emb"] else "") + match["ab"]
        found.setdefault((match["module"], adapter), {})[slot] = (key, tensor)
    if adapter_name is not None and not found:
        raise AdapterError(f"{where}: no LoRA pairs of adapter {adapter_name!r}")
    if settings is None and alpha is None and found:
        warnings.warn(
            f"{where}: no adapter config or alpha given, so scaling = 1.0 (σ of B·A); energy ranks are unaffected",
            stacklevel=3,
        )
    pairs = []
    overlapping: set[str] = set()
    for (module, adapter), slots in found.items():
        emb = "emb_A" in slots or "emb_B" in slots
        a_slot, b_slot = ("emb_A", "emb_B") if emb else ("A", "B")
        if a_slot not in slots or b_slot not in slots:
            present = next(iter(slots.values()))[0]
            raise AdapterError(f"{where}: {present} has no partner lora_{'B' if a_slot in slots else 'A'} key")
        (key_a, a), (key_b, b) = slots[a_slot], slots[b_slot]
        keys = (key_a, key_b)
        a, b = _factor(a, key_a, where), _factor(b, key_b, where)
        a2, b2, layout = _flatten_pair(a, b, keys, where)
        layout = "embedding" if emb else layout
        name = strip_prefix(module)
        adalora = "E" in slots
        r = int(a2.shape[0])
        if adalora:
            key_e, e = slots["E"]
            if not isinstance(e, torch.Tensor) or tuple(e.shape) != (r, 1):
                shape = tuple(e.shape) if isinstance(e, torch.Tensor) else type(e).__name__
                raise AdapterError(f"{where}: {key_e} has shape {shape}, expected ({r}, 1) for {key_a}")
            a2 = a2 * e.to(a2.dtype)
        if adalora:
            module_alpha = settings.alpha_for(name) if settings is not None else alpha
            scaling = 1.0 if module_alpha is None else adalora_scaling(module_alpha, r)
        elif settings is not None:
            if settings.is_adalora:
                raise AdapterError(f"{where}: the config is AdaLoRA's but {key_a} has no lora_E partner")
            expected = settings.rank_for(name)
            states_rank = "r" in settings.raw or bool(settings.rank_pattern)  # a partial config may leave r out
            if states_rank and r != expected and r in _matching_values(settings.rank_pattern, name):
                overlapping.add(name)  # PEFT's own save sorts pattern keys, so their order, which decides, is lost
            elif states_rank and r != expected:
                field_name = "rank_pattern" if settings.rank_pattern and expected != settings.r else "r"
                raise AdapterError(
                    f"{where}: {key_a} has shape {tuple(a.shape)} and {key_b} {tuple(b.shape)} (rank {r}), but "
                    f"the config gives {name!r} rank {expected} (field {field_name})"
                )
            scaling = settings.scaling_for(name, r)
        else:
            scaling = 1.0 if alpha is None else lora_scaling(alpha, r)
        if settings is not None and len(set(_matching_values(settings.alpha_pattern, name))) > 1:
            overlapping.add(name)
        pairs.append(
            LoraPair(
                name,
                a2,
                b2,
                float(scaling),
                adapter=adapter,
                layout=layout,
                keys=keys,
                shapes=(tuple(a.shape), tuple(b.shape)),
                dora=(module, adapter) in magnitudes or bool(settings and settings.use_dora),
                adalora=adalora,
            )
        )
    if overlapping:
        warnings.warn(
            f"{where}: several rank_pattern/alpha_pattern keys match {len(overlapping)} module(s) (e.g. "
            f"{sorted(overlapping)[0]!r}) with different values; PEFT takes the first key in order, and its own "
            "save_pretrained sorts the keys, so ranks are taken from the weights and alphas from the first key",
            stacklevel=3,
        )
    return pairs


def _matching_values(pattern: Mapping[str, Any], name: str) -> list[Any]:
    """Values of every key of ``pattern`` that matches ``name`` (PEFT uses only the first)."""
    return [value for key, value in pattern.items() if pattern_key({key: value}, name) is not None]


def _kohya_pairs(state: Mapping[str, torch.Tensor], file: Path) -> list[LoraPair]:
    where = str(file)
    found: dict[str, dict[str, str]] = {}
    for key in state:
        match = _KOHYA_KEY.match(key)
        if match is not None:
            found.setdefault(match["module"], {})[match["ab"]] = key
    pairs = []
    for module, slots in found.items():
        if set(slots) != {"down", "up"}:
            raise AdapterError(f"{where}: {next(iter(slots.values()))} has no partner lora_up/lora_down key")
        keys = (slots["down"], slots["up"])
        a, b = _factor(state[keys[0]], keys[0], where), _factor(state[keys[1]], keys[1], where)
        a2, b2, layout = _flatten_pair(a, b, keys, where)
        r = int(a2.shape[0])
        alpha_tensor = state.get(f"{module}.alpha")
        if alpha_tensor is None:
            alpha = float(r)  # kohya's convention: no alpha means alpha = r, scale 1
        elif not isinstance(alpha_tensor, torch.Tensor) or alpha_tensor.numel() != 1:
            raise AdapterError(f"{where}: {module}.alpha must be a scalar, got shape {tuple(alpha_tensor.shape)}")
        else:
            alpha = float(alpha_tensor.reshape(()))
            if not torch.isfinite(alpha_tensor).all():
                raise AdapterError(f"{where}: {module}.alpha is {alpha}")
        pairs.append(
            LoraPair(
                module,
                a2,
                b2,
                lora_scaling(alpha, r),
                layout=layout,
                keys=keys,
                shapes=(tuple(a.shape), tuple(b.shape)),
                dora=f"{module}.dora_scale" in state,
                sep="_",
            )
        )
    return pairs


# ---- models ----------------------------------------------------------------------------------------------------


def _pairs_from_module(model: torch.nn.Module, adapter_name: str | None) -> list[LoraPair]:
    pairs = []
    for full_name, module in model.named_modules():
        name = strip_prefix(full_name)
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if isinstance(lora_a, torch.Tensor) and isinstance(lora_b, torch.Tensor):  # lora_fast.LoraLinear or alike
            pairs.append(LoraPair(name, lora_a, lora_b, float(module.scaling)))
        elif isinstance(lora_a, torch.nn.ModuleDict) and isinstance(lora_b, torch.nn.ModuleDict):  # PEFT LoraLayer
            magnitude = getattr(module, "lora_magnitude_vector", None)
            for adapter in lora_a:
                if adapter_name is not None and adapter != adapter_name:
                    continue
                a, b = lora_a[adapter].weight, lora_b[adapter].weight
                layout = "linear" if a.ndim == 2 else "conv"
                dora = isinstance(magnitude, torch.nn.ModuleDict) and adapter in magnitude
                scaling = float(module.scaling[adapter])
                pairs.append(LoraPair(name, a.flatten(1), b.flatten(1), scaling, adapter, layout, dora=dora))
        elif isinstance(lora_a, torch.nn.ParameterDict) and isinstance(
            getattr(module, "lora_E", None), torch.nn.ParameterDict
        ):
            # PEFT AdaLoRA: ΔW = B (A ⊙ E) · scaling / (ranknum + 1e-5); pruned triplets have E = 0
            for adapter in lora_a:
                if adapter_name is None or adapter == adapter_name:
                    scaling = float(module.scaling[adapter]) / (float(module.ranknum[adapter]) + 1e-5)
                    a = lora_a[adapter] * module.lora_E[adapter]
                    pairs.append(LoraPair(name, a, lora_b[adapter], scaling, adapter, adalora=True))
        emb_a, emb_b = getattr(module, "lora_embedding_A", None), getattr(module, "lora_embedding_B", None)
        if isinstance(emb_a, torch.nn.ParameterDict) and isinstance(emb_b, torch.nn.ParameterDict):
            for adapter in emb_a:  # PEFT Embedding: ΔWᵀ = B A, same singular values
                if adapter_name is None or adapter == adapter_name:
                    scaling = float(module.scaling[adapter])
                    pairs.append(LoraPair(name, emb_a[adapter], emb_b[adapter], scaling, adapter, "embedding"))
    for pair in pairs:
        if pair.A.ndim != 2 or pair.B.ndim != 2 or pair.A.shape[0] != pair.B.shape[1]:
            raise AdapterError(
                f"{pair.name}: lora_A {tuple(pair.A.shape)} and lora_B {tuple(pair.B.shape)} do not form a LoRA pair"
            )
    return pairs


def find_pairs(
    source: torch.nn.Module | Mapping[str, Any] | str | os.PathLike,
    *,
    config: Any = None,
    adapter_name: str | None = None,
    alpha: float | None = None,
) -> list[LoraPair]:
    """Every LoRA pair of a model, a state dict or a saved adapter (see the module docstring for formats).

    Args:
        source: a model, a state dict, or a saved adapter (folder or weights file).
        config: LoRA config for state dicts and files (dict, ``LoraConfig`` or path); a folder's
            ``adapter_config.json`` is read when this is None. Modules carry their own scaling and ignore it.
        adapter_name: only this named adapter (default: all of a model or state dict).
        alpha: alpha for a state dict or file without any config.

    Raises:
        AdapterError: unreadable input, or no LoRA pair found.
    """
    if isinstance(source, torch.nn.Module):
        pairs = _pairs_from_module(source, adapter_name)
        where = type(source).__name__
    elif isinstance(source, Mapping):
        pairs = pairs_from_state_dict(source, read_settings(config), adapter_name, alpha=alpha)
        where = "the state dict"
    elif isinstance(source, (str, os.PathLike)):
        return read_adapter(source, adapter_name=adapter_name, config=config, alpha=alpha).pairs
    else:
        raise AdapterError(f"expected a model, a state dict or an adapter path, got {type(source).__name__}")
    if not pairs:
        raise AdapterError(f"found no LoRA adapters (no lora_A/lora_B pairs) in {where}")
    return pairs
