"""The experiments' typed configuration: every bad key or value is an error naming it (bad-input rows 6.3-6.12)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # after site-packages: the installed lora_fast (with _C) wins

from experiments.runner import cli  # noqa: E402
from experiments.runner.config import ConfigError  # noqa: E402
from experiments.runner.config import config_from_dict  # noqa: E402
from experiments.runner.config import config_to_dict  # noqa: E402
from experiments.runner.config import load_config  # noqa: E402
from experiments.studies import STUDIES  # noqa: E402

pytest.importorskip("yaml")


def yaml_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_file_changes_only_what_it_names(tmp_path: Path) -> None:
    config = load_config(yaml_file(tmp_path, "name: big\nrank_vs_classes:\n  subsets_per_count: 10\n  lora: {r: 64}\n"))
    default = load_config()
    s1, d1 = config.section("rank_vs_classes"), default.section("rank_vs_classes")
    assert config.name == "big" and s1.subsets_per_count == 10 and s1.lora["r"] == 64
    assert {k: v for k, v in s1.lora.items() if k != "r"} == {k: v for k, v in d1.lora.items() if k != "r"}
    assert s1.class_counts == d1.class_counts and config.studies == default.studies
    assert config.scale == "as configured in c.yaml"  # not the default's description


def test_round_trip_through_config_json() -> None:
    config = load_config()
    again = config_from_dict(json.loads(json.dumps(config_to_dict(config))), "config.json")
    assert config_to_dict(again) == config_to_dict(config)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("studies: rank_vs_classes\n", "studies: expected a list, got str 'rank_vs_classes'"),  # 6.5
        ("rank_vs_classes: {class_count: [2, 3]}\n", "unknown key 'class_count' (did you mean 'class_counts'?)"),
        (
            "rank_vs_clases: {class_counts: [2, 3]}\n",
            "unknown key or study section 'rank_vs_clases' (did you mean 'rank_vs_classes'?)",
        ),  # 6.7
        ("rank_vs_classes: null\n", "rank_vs_classes: expected a mapping of settings, got null"),  # 6.10
        ("rank_vs_classes: {lora: {max_steps: -3}}\n", "rank_vs_classes.lora.max_steps: every run needs a positive"),
        ("rank_vs_classes: {full: {max_steps: 0}}\n", "rank_vs_classes.full.max_steps"),  # 6.12
        ("rank_vs_classes: {lora: {max_step: 5}}\n", "unknown key 'max_step' (did you mean 'max_steps'?)"),  # 6.8
        ("rank_vs_classes: {lora: {lr: fast}}\n", "rank_vs_classes.lora.lr: expected a number, got str 'fast'"),
        ("rank_vs_classes: {lora: {seed: 3}}\n", "rank_vs_classes.lora.seed: set by the runner"),
        ("rank_vs_classes: {lora: {r: 0}}\n", "need r >= 1"),
        ("rank_vs_classes: {class_counts: [1, 4]}\n", "class_counts must be a non-empty list of counts >= 2"),
        ("rank_vs_classes: {train_size: 12.5}\n", "rank_vs_classes.train_size: expected an integer"),
        ("label_noise: {noise: [0.0, 1.5]}\n", "noise must be a non-empty list of fractions in [0, 1]"),
        ("label_noise: {model: {num_layer: 2}}\n", "label_noise.model: unknown key 'num_layer'"),
        ("progress: yes please\n", "progress: expected true or false"),
        ("studies: []\n", "studies: the list is empty"),
        ("studies: [rank_vs_clases]\n", "unknown study 'rank_vs_clases' (did you mean 'rank_vs_classes'?)"),
        ("rank_allocation: {strategies: [uniform9]}\n", "strategies: unknown ['uniform9']"),
        ("- a\n- b\n", "top level must be a mapping"),
    ],
)
def test_bad_config_is_an_error_naming_the_key_and_file(tmp_path: Path, text: str, message: str) -> None:
    path = yaml_file(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_yaml_1_1_exponent_is_read_as_a_number(tmp_path: Path) -> None:
    """6.9: PyYAML reads `2e-3` (no dot) as a string; a float field takes it as the number it means."""
    config = load_config(yaml_file(tmp_path, "rank_vs_classes:\n  lora: {lr: 2e-3}\n  full: {lr: 5E-5}\n"))
    assert config.section("rank_vs_classes").lora["lr"] == 0.002
    assert config.section("rank_vs_classes").full["lr"] == 5e-5


def test_invalid_json_config_names_the_file(tmp_path: Path) -> None:
    """6.3: a syntax error names the file, line and column, from the command line too."""
    path = tmp_path / "bad.json"
    path.write_text('{"name": "x",')
    with pytest.raises(ConfigError, match=r"bad\.json: invalid JSON at line 1, column 14"):
        load_config(path)
    with pytest.raises(SystemExit, match=r"bad\.json: invalid JSON"):
        cli.main(["--config", str(path), "--dry-run"])
    bad_yaml = yaml_file(tmp_path, "name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: invalid YAML"):
        load_config(bad_yaml)
    (tmp_path / "c.txt").write_text("name: x\n")
    with pytest.raises(ConfigError, match="json"):
        load_config(tmp_path / "c.txt")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")


def test_train_settings_follow_train_config_fields(tmp_path: Path) -> None:
    """Any TrainConfig field is configurable (so new ones work at once) and typed by TrainConfig's annotations."""
    from dataclasses import fields

    from lora_fast.train import TrainConfig

    settable = [f.name for f in fields(TrainConfig) if f.name not in ("seed", "device", "progress", "max_length")]
    assert "warmup_ratio" in settable
    config = load_config(yaml_file(tmp_path, "rank_vs_classes: {full: {warmup_ratio: 0.1, max_grad_norm: null}}\n"))
    assert config.section("rank_vs_classes").full["warmup_ratio"] == 0.1
    assert config.section("rank_vs_classes").full["max_grad_norm"] is None


@pytest.mark.parametrize("shipped", sorted((ROOT / "experiments" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(shipped: Path) -> None:
    config = load_config(shipped)
    assert set(config.studies) <= set(STUDIES) and config.scale
    if Path("/usr/share/wordnet/data.noun").is_file():
        per_study, specs = cli.plan_all(config)
        assert specs and all(per_study.values())
