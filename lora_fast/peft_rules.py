"""PEFT's LoRA rules, in one place: key prefix, target matching, pattern keys, layer index, scaling, config fields.

Everything that reads or writes PEFT's format (``injection``, ``peft_io``, ``adapters``, ``energy_rank.analyze``,
``shrink`` and the ``lora-fast`` command) takes these rules from here, so they agree with each other and with
PEFT (checked against peft 0.21):

- saved keys are ``base_model.model.<module>.lora_A.weight`` (``PEFT_PREFIX``; ``strip_prefix`` drops it);
- ``target_modules``: a string is a regex that must match the full module name; a list entry must equal the name or
  be a ``.``-suffix of it (``matches_target``);
- ``rank_pattern`` / ``alpha_pattern``: the first key (in order) for which ``(.*\\.)?(key)$`` matches the full name
  wins (``pattern_key``); keys are checked as regexes here (PEFT fails on a bad key with a bare ``re.error``);
- scaling: ``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora`` (``lora_scaling``); AdaLoRA divides
  ``alpha`` (or r when alpha is 0) by ``r + 1e-5`` (``adalora_scaling``);
- ``LoraSettings.from_dict`` parses an ``adapter_config.json`` and names the field and the file on bad values.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from typing import Any

__all__ = [
    "PEFT_PREFIX",
    "ConfigError",
    "LoraSettings",
    "adalora_scaling",
    "alpha_for_scaling",
    "check_dropout",
    "check_names",
    "check_number",
    "check_pattern",
    "check_rank",
    "is_saved_module",
    "layer_and_kind",
    "layer_index",
    "lora_scaling",
    "match_pattern",
    "matches_saved_entry",
    "matches_target",
    "most_common",
    "pattern_from_values",
    "pattern_key",
    "strip_prefix",
    "unmatched_keys",
]

PEFT_PREFIX = "base_model.model."
# the last name component says nothing about the matrix for these: keep its path inside the block instead
_GENERIC_KINDS = {"dense", "proj", "linear", "fc", "out", "output", "weight"}


class ConfigError(ValueError):
    """A LoRA config (an ``adapter_config.json`` or arguments) has a bad field; the message names the field."""


def strip_prefix(name: str) -> str:
    """The module name inside the base model: ``name`` without PEFT's ``base_model.model.`` prefix."""
    return name.removeprefix(PEFT_PREFIX)


# ---- matching --------------------------------------------------------------------------------------------------


def matches_target(name: str, target_modules: str | Sequence[str]) -> bool:
    """PEFT's rule: a regex string must match the full name; a list entry must equal the name or be a ``.``-suffix.

    Args:
        name: the module's full name in ``model.named_modules()``.
        target_modules: regex string, or list of names/suffixes.
    """
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == target or name.endswith("." + target) for target in target_modules)


def matches_saved_entry(name: str, entry: str) -> bool:
    """True when ``modules_to_save`` entry ``entry`` names the module ``name`` (equal, or a ``.``-suffix of it)."""
    return name == entry or name.endswith("." + entry)


def is_saved_module(name: str, modules_to_save: Sequence[str]) -> bool:
    """True for a module to save or anything inside one; such modules never get an adapter (PEFT's rule).

    Args:
        name: full module name.
        modules_to_save: the config's ``modules_to_save`` entries.
    """
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in modules_to_save)


def _key_regex(key: str) -> re.Pattern[str]:
    return re.compile(rf"(.*\.)?({key})$")


def pattern_key(pattern: Mapping[str, Any] | None, name: str) -> str | None:
    """The first key of ``pattern`` (in order) that matches ``name`` as PEFT's ``rank_pattern`` does, or None.

    A key matches when ``(.*\\.)?(key)$`` matches the full name: the key is a regex for a ``.``-suffix.
    """
    for key in pattern or {}:
        if _key_regex(key).match(name):
            return key
    return None


def match_pattern(pattern: Mapping[str, Any] | None, name: str, default: Any) -> Any:
    """The value of the first key of ``pattern`` that matches ``name`` (``pattern_key``), else ``default``.

    Args:
        pattern: {name-or-regex: value}, or None.
        name: the module's full name.
        default: the value when no key matches.
    """
    key = pattern_key(pattern, name)
    return default if key is None else pattern[key]  # type: ignore[index]


def check_pattern(pattern: Any, field_name: str, where: str = "config") -> dict[str, Any]:
    """``pattern`` as a dict after checking that it is a mapping of valid regex keys.

    Raises:
        ConfigError: not a mapping, a non-string key, or a key that is not a valid regular expression.
    """
    if pattern is None:
        return {}
    if not isinstance(pattern, Mapping):
        raise ConfigError(f"{where}: {field_name} must be a mapping of module name to value, got {pattern!r}")
    for key in pattern:
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{where}: {field_name} key {key!r} must be a non-empty string")
        try:
            _key_regex(key)
        except re.error as exc:
            raise ConfigError(f"{where}: {field_name} key {key!r} is not a valid regular expression ({exc})") from None
    return dict(pattern)


def unmatched_keys(pattern: Mapping[str, Any] | None, names: Iterable[str]) -> list[str]:
    """Keys of ``pattern`` that match none of ``names`` (PEFT ignores them silently; they are usually typos)."""
    names = list(names)
    return [key for key in pattern or {} if not any(_key_regex(key).match(name) for name in names)]


def pattern_from_values(values: Mapping[str, Any], default: Any) -> dict[str, Any]:
    """A ``rank_pattern``/``alpha_pattern`` that gives every module in ``values`` its value, with ``default`` as the
    config's base value: one key per module whose value differs, its full name (PEFT's convention).

    A full name is a regex suffix that could also catch another module (dots match any character; a full name can be
    a ``.``-suffix of a longer one). Such keys are escaped and anchored (``^`` inside PEFT's ``(.*\\.)?(key)$`` only
    matches at the start), so every module in ``values`` resolves to its own value, which is checked.

    Args:
        values: value per full module name (every module the adapter has).
        default: the config's ``r`` or ``lora_alpha``.
    """
    pattern = {}
    for name, value in values.items():
        if value == default:
            continue
        regex = _key_regex(name)
        catches_other = any(other != name and values[other] != value and regex.match(other) for other in values)
        pattern["^" + re.escape(name) if catches_other else name] = value
    for name, value in values.items():
        if match_pattern(pattern, name, default) != value:
            # a plain full-name key of an earlier module catches this one: anchor every key
            pattern = {"^" + re.escape(n): v for n, v in values.items() if v != default}
            break
    return pattern


def most_common(values: Iterable[Any]) -> Any:
    """The most frequent value (the first seen among ties): the base ``r``/``lora_alpha`` that needs fewest keys."""
    return Counter(values).most_common(1)[0][0]


# ---- layer index and kind --------------------------------------------------------------------------------------


def layer_index(name: str, sep: str = ".") -> int | None:
    """Index of the block a module sits in: its first all-digit name component (``layers.12.q_proj`` -> 12).

    Args:
        name: module name.
        sep: component separator (``"_"`` for kohya's ``lora_te_text_model_encoder_layers_0_self_attn_q_proj``).
    """
    return next((int(part) for part in name.split(sep) if part.isdigit()), None)


def layer_and_kind(name: str, sep: str = ".") -> tuple[int | None, str]:
    """(block index, matrix kind) of a module name.

    The kind is the module's own name (``query``, ``q_proj``), or its path inside the block when that name is generic
    (``attention.output.dense`` vs ``output.dense``). With ``sep="_"`` (kohya names) it is everything after the block
    index (``self_attn_q_proj``).
    """
    parts = name.split(sep)
    at = next((i for i, part in enumerate(parts) if part.isdigit()), None)
    inner = parts[at + 1 :] if at is not None and at + 1 < len(parts) else parts
    if sep != ".":
        return (int(parts[at]) if at is not None else None), sep.join(inner)
    kind = ".".join(inner) if inner[-1] in _GENERIC_KINDS else inner[-1]
    return (int(parts[at]) if at is not None else None), kind


# ---- scaling ---------------------------------------------------------------------------------------------------


def lora_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """PEFT's LoRA scaling s in ΔW = s·B·A: ``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA."""
    return float(alpha) / (math.sqrt(r) if use_rslora else r)


def alpha_for_scaling(scaling: float, r: int, use_rslora: bool = False) -> float:
    """The alpha that makes PEFT compute ``scaling`` at rank ``r`` (inverse of ``lora_scaling``)."""
    return float(scaling) * (math.sqrt(r) if use_rslora else r)


def adalora_scaling(alpha: float, r: int) -> float:
    """AdaLoRA's effective scaling ``alpha / (ranknum + 1e-5)``, alpha 0 meaning r; ranknum is the saved rank."""
    return (float(alpha) if alpha > 0 else float(r)) / (r + 1e-5)


# ---- config ----------------------------------------------------------------------------------------------------


def check_number(value: Any, field_name: str, where: str, *, allow_zero: bool = False) -> float:
    """``value`` as a float after checking it is a finite real number (and not 0 unless allowed).

    Raises:
        ConfigError: naming ``where`` and ``field_name``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: {field_name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{where}: {field_name} must be finite, got {value!r}")
    if value == 0 and not allow_zero:
        raise ConfigError(f"{where}: {field_name} is 0, so every ΔW (and the gradient of A and B) would be zero")
    return float(value)


def check_rank(value: Any, field_name: str, where: str) -> int:
    """``value`` after checking it is a positive int (bools and floats refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: {field_name} must be a positive int, got {value!r}")
    return value


def check_dropout(value: Any, field_name: str, where: str) -> float:
    """``value`` as a float after checking it is a number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"{where}: {field_name} must be a number in [0, 1), got {value!r}")
    return float(value)


def check_names(value: Any, field_name: str, where: str, *, allow_regex: bool) -> str | list[str] | None:
    """A module-name list (or, with ``allow_regex``, a regex string) after checking its type.

    A plain string where only a list makes sense (``modules_to_save="classifier"``) is taken as one name.
    """
    if value is None:
        return None
    if isinstance(value, str):
        if not value:
            raise ConfigError(f"{where}: {field_name} is an empty string")
        if allow_regex:
            try:
                re.compile(value)
            except re.error as exc:
                message = f"{where}: {field_name} {value!r} is not a valid regular expression ({exc})"
                raise ConfigError(message) from None
            return value
        return [value]  # one name where a list is expected: what the user means, not a list of characters
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) and v for v in value):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    kinds = "a list of module names" + (" or a regex string" if allow_regex else "")
    raise ConfigError(f"{where}: {field_name} must be {kinds}, got {value!r}")


def _flag(raw: Mapping[str, Any], key: str, where: str) -> bool:
    value = raw.get(key) or False
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class LoraSettings:
    """The fields of a PEFT LoRA (or AdaLoRA) config that decide shapes, matching and scaling.

    Build it with ``from_dict`` (validates and names bad fields); ``raw`` keeps the whole dict so that a config can be
    written back with its other fields untouched.
    """

    peft_type: str = "LORA"
    r: int = 8
    lora_alpha: float = 8.0
    target_modules: str | list[str] | None = None
    rank_pattern: dict[str, Any] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: list[str] | None = None
    fan_in_fan_out: bool = False
    lora_dropout: float = 0.0
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, raw: Any, where: str = "config") -> LoraSettings:
        """Parse a config dict (e.g. ``json.load`` of ``adapter_config.json``), with PEFT's defaults.

        Args:
            raw: the config mapping.
            where: what to call it in errors (the file's path).

        Raises:
            ConfigError: the message names ``where``, the field and the bad value.
        """
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}: a LoRA config must be a JSON object, got {type(raw).__name__}")
        raw = dict(raw)
        peft_type = raw.get("peft_type") or "LORA"
        if not isinstance(peft_type, str) or peft_type.upper() not in ("LORA", "ADALORA"):
            raise ConfigError(f"{where}: peft_type {peft_type!r} is not LoRA (LORA or ADALORA)")
        peft_type = peft_type.upper()
        adalora = peft_type == "ADALORA"
        r = check_rank(raw.get("init_r" if adalora else "r", 12 if adalora else 8), "init_r" if adalora else "r", where)
        alpha = check_number(raw.get("lora_alpha", 8), "lora_alpha", where, allow_zero=adalora)
        rank_pattern = check_pattern(raw.get("rank_pattern"), "rank_pattern", where)
        if not adalora:  # AdaLoRA's rank_pattern holds boolean masks, not ranks
            for key, value in rank_pattern.items():
                check_rank(value, f"rank_pattern[{key!r}]", where)
        alpha_pattern = check_pattern(raw.get("alpha_pattern"), "alpha_pattern", where)
        for key, value in alpha_pattern.items():
            check_number(value, f"alpha_pattern[{key!r}]", where)
        dropout = check_dropout(raw.get("lora_dropout") or 0.0, "lora_dropout", where)
        return cls(
            peft_type=peft_type,
            r=r,
            lora_alpha=float(alpha),
            target_modules=check_names(raw.get("target_modules"), "target_modules", where, allow_regex=True),
            rank_pattern=rank_pattern,
            alpha_pattern={k: float(v) for k, v in alpha_pattern.items()},
            use_rslora=_flag(raw, "use_rslora", where),
            use_dora=_flag(raw, "use_dora", where),
            modules_to_save=check_names(raw.get("modules_to_save"), "modules_to_save", where, allow_regex=False),
            fan_in_fan_out=_flag(raw, "fan_in_fan_out", where),
            lora_dropout=dropout,
            raw=raw,
        )

    @property
    def is_adalora(self) -> bool:
        return self.peft_type == "ADALORA"

    def rank_for(self, name: str) -> int:
        """The rank PEFT gives module ``name`` (``rank_pattern``, else ``r``); AdaLoRA: ``init_r``."""
        return self.r if self.is_adalora else int(match_pattern(self.rank_pattern, name, self.r))

    def alpha_for(self, name: str) -> float:
        """The alpha PEFT gives module ``name`` (``alpha_pattern``, else ``lora_alpha``)."""
        return float(match_pattern(self.alpha_pattern, name, self.lora_alpha))

    def scaling_for(self, name: str, r: int) -> float:
        """s in ΔW = s·B·A for module ``name`` with rank ``r`` (the saved factors' rank)."""
        if self.is_adalora:
            return adalora_scaling(self.alpha_for(name), r)
        return lora_scaling(self.alpha_for(name), r, self.use_rslora)
