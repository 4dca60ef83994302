"""lora_fast.peft_rules against PEFT's own functions and on the config errors it must name."""

from __future__ import annotations

import math
import random
import re

import pytest

from lora_fast.peft_rules import ConfigError
from lora_fast.peft_rules import LoraSettings
from lora_fast.peft_rules import adalora_scaling
from lora_fast.peft_rules import alpha_for_scaling
from lora_fast.peft_rules import check_pattern
from lora_fast.peft_rules import is_saved_module
from lora_fast.peft_rules import layer_and_kind
from lora_fast.peft_rules import layer_index
from lora_fast.peft_rules import lora_scaling
from lora_fast.peft_rules import match_pattern
from lora_fast.peft_rules import matches_target
from lora_fast.peft_rules import pattern_from_values
from lora_fast.peft_rules import pattern_key
from lora_fast.peft_rules import strip_prefix
from lora_fast.peft_rules import unmatched_keys

NAMES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.11.self_attn.q_proj",
    "model.layers.1.mlp.down_proj",
    "vision.model.layers.1.self_attn.q_proj",  # ends with another module's full name
    "bert.encoder.layer.3.attention.output.dense",
    "bert.encoder.layer.3.output.dense",
]


def test_target_matching_is_peft_s() -> None:
    peft_other = pytest.importorskip("peft.utils.other")
    assert matches_target("bert.encoder.layer.3.output.dense", ["output.dense"])
    assert not matches_target("bert.encoder.layer.3.output.dense2", ["output.dense"])
    assert not matches_target("xquery", ["query"])
    assert matches_target("layer.1.query", r".*\.1\.query") and not matches_target("layer.1.query2", r".*\.1\.query")
    for name in NAMES:
        for regex in (r".*q_proj", r"model\.layers\.1\..*", r".*\.(1|11)\..*"):
            assert matches_target(name, regex) == bool(peft_other.match_target_against_key(regex, name))


def test_pattern_keys_match_peft_get_pattern_key() -> None:
    peft_other = pytest.importorskip("peft.utils.other")
    patterns = {"q_proj": 4, r"layers\.1\..*": 8, "down_proj": 2, "layers.1.self_attn.q_proj": 16}
    for name in NAMES:
        key = peft_other.get_pattern_key(patterns.keys(), name)
        assert match_pattern(patterns, name, 99) == patterns.get(key, 99)
        assert pattern_key(patterns, name) == (key if key in patterns else None)
    # first key in order wins, as in PEFT
    assert match_pattern({"q_proj": 1, "self_attn.q_proj": 2}, NAMES[0], 0) == 1
    assert unmatched_keys({"q_proj": 1, "valu": 2, "o_proj": 3}, NAMES) == ["valu", "o_proj"]


def test_pattern_from_values_resolves_every_module_to_its_value() -> None:
    rng = random.Random(0)
    names = NAMES + [f"m.{i}.{kind}" for i in range(12) for kind in ("a", "b.a", "ab")]
    for trial in range(20):
        values = {name: rng.choice([1, 2, 4, 8]) for name in names}
        default = rng.choice([2, 4])
        pattern = pattern_from_values(values, default)
        for name, value in values.items():
            assert match_pattern(pattern, name, default) == value, (trial, name)
        assert all(value != default for value in pattern.values())
    # a plain full name is kept where it catches nothing else, anchored where it would
    values = {"model.layers.1.self_attn.q_proj": 4, "vision.model.layers.1.self_attn.q_proj": 8}
    pattern = pattern_from_values(values, 2)
    assert "vision.model.layers.1.self_attn.q_proj" in pattern
    assert "^" + re.escape("model.layers.1.self_attn.q_proj") in pattern


def test_saved_module_rule() -> None:
    assert is_saved_module("classifier", ["classifier"]) and is_saved_module("m.classifier.dense", ["classifier"])
    assert not is_saved_module("m.classifier2", ["classifier"])


def test_layer_and_kind() -> None:
    assert layer_index("model.layers.12.self_attn.q_proj") == 12 and layer_index("lm_head") is None
    assert layer_and_kind("bert.encoder.layer.3.attention.self.query") == (3, "query")
    assert layer_and_kind("bert.encoder.layer.3.attention.output.dense") == (3, "attention.output.dense")
    assert layer_and_kind("bert.pooler.dense") == (None, "bert.pooler.dense")
    kohya = "lora_te_text_model_encoder_layers_7_self_attn_q_proj"
    assert layer_and_kind(kohya, sep="_") == (7, "self_attn_q_proj")
    assert strip_prefix("base_model.model.x.y") == "x.y" and strip_prefix("x.y") == "x.y"


@pytest.mark.parametrize("rslora", [False, True])
def test_scaling_round_trip(rslora: bool) -> None:
    for alpha, r in [(16, 8), (24, 4), (-3.5, 7), (1, 300)]:
        s = lora_scaling(alpha, r, rslora)
        assert s == pytest.approx(alpha / (math.sqrt(r) if rslora else r))
        assert alpha_for_scaling(s, r, rslora) == pytest.approx(alpha)
    assert adalora_scaling(12, 6) == pytest.approx(12 / (6 + 1e-5))
    assert adalora_scaling(0, 6) == pytest.approx(6 / (6 + 1e-5))  # PEFT: alpha 0 means r


def test_settings_defaults_and_lookup() -> None:
    s = LoraSettings.from_dict(
        {"r": 8, "lora_alpha": 16, "rank_pattern": {"value": 4}, "alpha_pattern": {"query": 24}, "use_rslora": True}
    )
    assert (s.rank_for("l.0.value"), s.rank_for("l.0.query"), s.alpha_for("l.0.query"), s.alpha_for("x")) == (
        4,
        8,
        24.0,
        16.0,
    )
    assert s.scaling_for("l.0.value", 4) == pytest.approx(16 / 2)
    assert LoraSettings.from_dict({}).r == 8  # PEFT's defaults
    assert LoraSettings.from_dict({"modules_to_save": "classifier"}).modules_to_save == ["classifier"]
    ada = LoraSettings.from_dict({"peft_type": "ADALORA", "init_r": 6, "lora_alpha": 0, "rank_pattern": {"x": [True]}})
    assert ada.is_adalora and ada.rank_for("x") == 6


@pytest.mark.parametrize(
    "raw, match",
    [
        ([1, 2], "JSON object, got list"),
        ({"lora_alpha": None}, "lora_alpha must be a number, got None"),
        ({"lora_alpha": "sixteen"}, "lora_alpha must be a number, got 'sixteen'"),
        ({"lora_alpha": float("nan")}, "lora_alpha must be finite"),
        ({"lora_alpha": 0}, "lora_alpha is 0"),
        ({"r": 0}, "r must be a positive int"),
        ({"r": 4.0}, "r must be a positive int"),
        ({"alpha_pattern": {"query(": 4}}, r"alpha_pattern key 'query\(' is not a valid regular expression"),
        ({"rank_pattern": {"value": 0}}, r"rank_pattern\['value'\] must be a positive int"),
        ({"rank_pattern": ["value"]}, "rank_pattern must be a mapping"),
        ({"target_modules": 123}, "target_modules must be a list of module names or a regex string, got 123"),
        ({"target_modules": "query("}, "target_modules 'query\\(' is not a valid regular expression"),
        ({"use_rslora": "yes"}, "use_rslora must be true or false"),
        ({"lora_dropout": 1.0}, r"lora_dropout must be a number in \[0, 1\)"),
        ({"peft_type": "LOHA"}, "peft_type 'LOHA' is not LoRA"),
    ],
)
def test_settings_name_the_bad_field(raw, match) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        LoraSettings.from_dict(raw, "somewhere/adapter_config.json")
    assert str(info.value).startswith("somewhere/adapter_config.json: ")


def test_check_pattern_names_the_field() -> None:
    assert check_pattern(None, "rank_pattern") == {}
    with pytest.raises(ConfigError, match=r"inject: rank_pattern key 'value\(' is not a valid regular expression"):
        check_pattern({"value(": 4}, "rank_pattern", "inject")
    with pytest.raises(ConfigError, match="must be a non-empty string"):
        check_pattern({3: 4}, "rank_pattern", "inject")
