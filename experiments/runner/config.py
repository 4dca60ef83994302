"""Typed configuration: global settings plus one section per study, each a frozen dataclass with its defaults.

A configuration file (YAML or JSON) holds global keys (``SweepConfig``'s fields) and one section per study, named
after it; it only needs the keys it changes. Every key is checked against the dataclass it lands in: an unknown or
misspelt key or section is an error naming it (with the closest known name), a value of the wrong type is an error
naming its key and file, and YAML 1.1's ``2e-3`` (read as a string by PyYAML) is accepted as the number it means.
The defaults of each study live in that study's dataclass and nowhere else.

Training settings (``lora:`` and ``full:`` of a study) pass through to ``lora_fast.train.TrainConfig``: any of its
fields is accepted and checked against its type, so a field added to ``TrainConfig`` is configurable at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "ConfigError",
    "LoraSettings",
    "ModelSettings",
    "SweepConfig",
    "TrainSettings",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "read_config_file",
]


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names it (and the file it came from)."""


# TrainConfig fields the runner sets itself for every run: the seed comes from the plan, device and progress from
# the invocation, max_length from the study's model section.
RUNNER_SET_TRAIN_FIELDS = ("seed", "device", "progress", "max_length")
# keys of a LoRA section that are not TrainConfig fields: what lora_fast.inject receives
LORA_KEYS = {"targets": list[str], "r": int, "alpha": float, "dropout": float, "use_rslora": bool}


class TrainSettings(dict):
    """``lora_fast.train.TrainConfig`` keyword arguments, checked against its fields (a dict subclass)."""


class LoraSettings(TrainSettings):
    """``TrainSettings`` plus the adapter's ``targets``, ``r``, ``alpha``, ``dropout`` and ``use_rslora``
    (``lora_fast.inject``)."""


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """The base model of a study.

    Args:
        name: a key of ``experiments.models.CLASSIFIERS`` / ``CAUSAL_LMS`` (or a local model folder).
        num_layers: keep only the first blocks (None = all).
        max_length: token truncation length.
    """

    name: str = "minilm"
    num_layers: int | None = 6
    max_length: int = 32

    def __post_init__(self) -> None:
        if self.num_layers is not None and self.num_layers < 1:
            raise ConfigError(f"num_layers must be >= 1 or null, got {self.num_layers}")
        if self.max_length < 2:
            raise ConfigError(f"max_length must be >= 2, got {self.max_length}")


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """Global settings of one invocation's sweep, plus the study sections (``sections``).

    Args:
        name: names the results folder.
        scale: one line saying what scale this is (printed and stored in summary.md).
        seed: base seed of data sampling and training.
        device: ``auto``, ``cpu`` or ``cuda``.
        progress: show progress bars.
        num_threads: torch threads per worker (None: the cores divided among the workers).
        workers: worker processes running runs in parallel (None: the measured default for the machine's cores).
        studies: studies to run, in order.
        sections: one typed section per registered study (defaults where the file gave none).
    """

    name: str = "default-cpu"
    scale: str = "as configured"
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    num_threads: int | None = None
    workers: int | None = None
    studies: tuple[str, ...] = ()
    sections: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError(f"num_threads must be >= 1, got {self.num_threads}")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")

    def section(self, study: str) -> Any:
        """The typed section of ``study``.

        Args:
            study: a registered study name.
        """
        return self.sections[study]


# ------------------------------------------------------------------------------------------------ type checking


def _closest(key: str, known: list[str]) -> str:
    match = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _describe(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` checked against the type hint ``tp`` (and converted where YAML left a number as a string)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got null")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: expected {_type_name(tp)}, got "
                          f"{_describe(value)}")  # fmt: skip
    if tp is Any:
        return value
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {_describe(value)}")
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {_describe(value)}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _parse_dataclass(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML follows YAML 1.1, where a float needs a dot: `2e-3` arrives as the string "2e-3"
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {_describe(value)}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {_describe(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {_describe(value)}")
        return value
    raise TypeError(f"{where}: unsupported type hint {tp!r}")


def _type_name(tp: Any) -> str:
    return " or ".join("null" if a is type(None) else getattr(a, "__name__", str(a)) for a in typing.get_args(tp))


def _train_config_hints() -> dict[str, Any]:
    from lora_fast.train import TrainConfig

    return typing.get_type_hints(TrainConfig)


def _parse_settings(cls: type, value: Any, default: Mapping[str, Any], where: str) -> TrainSettings:
    """A ``TrainSettings``/``LoraSettings``: ``value`` merged over ``default``, every key checked and typed."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping of training settings, got {_describe(value)}")
    hints = {k: v for k, v in _train_config_hints().items() if k not in RUNNER_SET_TRAIN_FIELDS}
    if cls is LoraSettings:
        hints.update(LORA_KEYS)
    out = cls(default)
    for key, item in value.items():
        if key in RUNNER_SET_TRAIN_FIELDS:
            raise ConfigError(f"{where}.{key}: set by the runner for every run (seed: the plan; device, progress: "
                              "the invocation; max_length: the study's model section); remove it here")  # fmt: skip
        if key not in hints:
            raise ConfigError(f"{where}: unknown key {key!r}{_closest(str(key), sorted(hints))}; known: "
                              f"{', '.join(sorted(hints))}")  # fmt: skip
        out[key] = _coerce(item, hints[key], f"{where}.{key}")
    steps = out.get("max_steps")
    if steps is None or steps < 1:
        raise ConfigError(f"{where}.max_steps: every run needs a positive step count, got {steps!r}")
    if cls is LoraSettings:
        for key in ("targets", "r", "alpha"):
            if key not in out:
                raise ConfigError(f"{where}: missing {key!r}")
        if out["r"] < 1 or not out["targets"]:
            raise ConfigError(f"{where}: need r >= 1 and at least one target, got r={out['r']}, "
                              f"targets={out['targets']}")  # fmt: skip
    # TrainConfig's own checks (ranges of lr, batch sizes, ...) run here, before any run starts
    from lora_fast.train import TrainConfig

    try:
        TrainConfig(**{k: v for k, v in out.items() if k not in LORA_KEYS})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return out


def _parse_dataclass(cls: type, value: Any, where: str, base: Any = None) -> Any:
    """An instance of dataclass ``cls`` from a mapping, starting from ``base`` (or the defaults)."""
    if value is None:
        raise ConfigError(f"{where}: expected a mapping of settings, got null (write {{}} for the defaults)")
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping of settings, got {_describe(value)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    start = base if base is not None else cls()
    kwargs: dict[str, Any] = {}
    for key, item in value.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {key!r}{_closest(str(key), sorted(fields))}; known: "
                              f"{', '.join(sorted(fields))}")  # fmt: skip
        tp = hints[key]
        inner = f"{where}.{key}" if where else key
        if isinstance(tp, type) and issubclass(tp, TrainSettings):
            kwargs[key] = _parse_settings(tp, item, getattr(start, key), inner)
        elif dataclasses.is_dataclass(tp):
            kwargs[key] = _parse_dataclass(tp, item, inner, getattr(start, key))
        else:
            kwargs[key] = _coerce(item, tp, inner)
    try:
        return dataclasses.replace(start, **kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}" if where else str(exc)) from None


# ------------------------------------------------------------------------------------------------ whole configs


def config_from_dict(
    data: Mapping[str, Any], source: str = "configuration", base: SweepConfig | None = None
) -> SweepConfig:
    """A checked ``SweepConfig`` from a mapping of global keys and study sections.

    Args:
        data: the parsed file.
        source: names the file in error messages.
        base: the configuration ``data`` changes (default: every study's defaults, ``default_config()``).
    """
    from experiments.studies import STUDIES
    from experiments.studies import get_study

    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: top level must be a mapping, got {_describe(data)}")
    base = base if base is not None else default_config()
    global_keys = {f.name for f in dataclasses.fields(SweepConfig)} - {"sections"}
    unknown = [k for k in data if k not in global_keys and k not in STUDIES]
    if unknown:
        key = str(unknown[0])
        hint = _closest(key, [*global_keys, *STUDIES])
        raise ConfigError(f"{source}: unknown key or study section {key!r}{hint}; global keys: "
                          f"{', '.join(sorted(global_keys))}; study sections: {', '.join(STUDIES)}")  # fmt: skip
    try:
        config = _parse_dataclass(SweepConfig, {k: v for k, v in data.items() if k in global_keys}, "", base)
        sections = dict(base.sections)
        for name in STUDIES:
            if name in data:
                sections[name] = _parse_dataclass(get_study(name).Config, data[name], name, sections[name])
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    for name in config.studies:
        if name not in STUDIES:
            raise ConfigError(f"{source}: studies: unknown study {name!r}{_closest(name, list(STUDIES))}; registered:"
                              f" {', '.join(STUDIES)}")  # fmt: skip
    if not config.studies:
        raise ConfigError(f"{source}: studies: the list is empty; name at least one of {', '.join(STUDIES)}")
    if len(set(config.studies)) != len(config.studies):
        raise ConfigError(f"{source}: studies: a study is listed twice: {list(config.studies)}")
    return dataclasses.replace(config, sections=sections)


def config_to_dict(config: SweepConfig) -> dict[str, Any]:
    """JSON-able form of ``config`` (global keys, then every study section) that ``config_from_dict`` reads back."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Mapping):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    out = {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config) if f.name != "sections"}
    out.update({name: plain(section) for name, section in config.sections.items()})
    return out


def default_config() -> SweepConfig:
    """The embedded default: every registered study's section at its defaults; ``DEFAULT_STUDIES`` run."""
    from experiments.studies import DEFAULT_STUDIES
    from experiments.studies import STUDIES
    from experiments.studies import get_study

    return SweepConfig(
        name="default-cpu",
        scale=DEFAULT_SCALE,
        studies=tuple(DEFAULT_STUDIES),
        sections={name: get_study(name).Config() for name in STUDIES},
    )


# One line for summary.md; the studies' dataclasses hold the numbers.
DEFAULT_SCALE = (
    "CPU default: 6-layer MiniLM on WordNet glosses; study 1 with 5 class counts x 3 random class subsets, LoRA r=32, "
    "controls; label noise to p=0.5 with repeats; plus a ViT slice (DINOv2 ViT-S/14 tuned for saliency, clip art at "
    "56 px: 3 class counts x 2 subsets, label noise p in {0, 0.5} x 2); sized to ~15 min on 2 cores. Not the "
    "published scale (experiments/configs/paper_cpu.yaml and paper_cpu_vision.yaml are the closest this CPU allows)"
)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a ``.json``, ``.yaml`` or ``.yml`` file into a dict; syntax errors name the file.

    Args:
        path: the file.
    """
    path = Path(path)
    if path.suffix not in (".yaml", ".yml", ".json"):
        raise ConfigError(f"{path}: config files must end in .json, .yaml or .yml")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, got {_describe(data)}")
    return data


def load_config(path: str | Path | None = None) -> SweepConfig:
    """The embedded default, with the file at ``path`` (if any) applied over it.

    Args:
        path: optional YAML/JSON file.
    """
    if path is None:
        return default_config()
    data = read_config_file(path)
    # the default's scale line describes the default; a file that changes the sweep without saying so gets a neutral one
    data.setdefault("scale", f"as configured in {Path(path).name}")
    return config_from_dict(data, str(path))
