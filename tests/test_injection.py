"""inject's argument checks (bad-input rows 4.3–4.5, 4.10–4.13): a failed call leaves the model as it was."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lora_fast
import lora_fast.injection as injection
from lora_fast.layers import LoraLinear


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(16, 16)
        self.value = nn.Linear(16, 16)


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.ModuleList(Block() for _ in range(2))
        self.classifier = nn.Linear(16, 3)


def snapshot(model: nn.Module) -> tuple[list, dict]:
    modules = [(name, type(m)) for name, m in model.named_modules()]
    return modules, {name: p.requires_grad for name, p in model.named_parameters()}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(alpha=0), "alpha is 0, so every ΔW"),  # 4.3: scaling 0 would freeze A and B at their init for ever
        (dict(alpha=math.nan), "alpha must be finite, got nan"),  # 4.4
        (dict(alpha=math.inf), "alpha must be finite"),
        (dict(alpha=None), "alpha must be a number, got None"),  # 4.5
        (dict(alpha="16"), "alpha must be a number, got '16'"),
        (dict(dropout="0.1"), r"dropout must be a number in \[0, 1\), got '0.1'"),
        (dict(target_modules=123), "target_modules must be a list of module names or a regex string, got 123"),
        (dict(target_modules=[]), "target_modules is empty"),
        (dict(target_modules="query("), r"target_modules 'query\(' is not a valid regular expression"),
        (dict(use_rslora="yes"), "use_rslora must be True or False"),
        (dict(r=2.5), "r must be a positive int, got 2.5"),
        (dict(rank_pattern={"valu": 4}), r"rank_pattern keys \['valu'\] match none of the 4 target modules"),  # 4.12
        (dict(rank_pattern={"value(": 4}), r"rank_pattern key 'value\(' is not a valid regular expression"),  # 4.13
        (dict(alpha_pattern={"query": math.nan}), r"alpha_pattern\['query'\] must be finite"),
        (dict(rank_pattern={"value": 0}), r"rank_pattern\['value'\] must be a positive int"),
        (dict(modules_to_save=["head"]), "modules_to_save entry 'head' matched no module"),
    ],
)
def test_bad_arguments_are_named_and_leave_the_model_untouched(kwargs, match) -> None:
    model = Model()
    before = snapshot(model)
    arguments = {"target_modules": ["query", "value"], **kwargs}
    with pytest.raises(ValueError, match=match) as info:
        lora_fast.inject(model, **arguments)
    assert str(info.value).startswith("inject: ")
    assert snapshot(model) == before


def test_failure_while_building_layers_restores_the_model(monkeypatch) -> None:
    model = Model()
    before = snapshot(model)
    built = []

    class FailOnThird(LoraLinear):
        def __init__(self, *args, **kwargs) -> None:
            if len(built) == 2:
                raise RuntimeError("out of memory")
            built.append(1)
            super().__init__(*args, **kwargs)  # freezes its base layer, which the restore must undo

    monkeypatch.setattr(injection, "LoraLinear", FailOnThird)
    with pytest.raises(RuntimeError, match="out of memory"):
        lora_fast.inject(model, ["query", "value"])
    assert snapshot(model) == before


def test_a_second_inject_keeps_the_first_modules_to_save_trainable(tmp_path) -> None:  # 4.10
    model = lora_fast.inject(Model(), ["query"], modules_to_save=["classifier"])
    lora_fast.inject(model, ["value"])
    assert model.classifier.weight.requires_grad and model.classifier.bias.requires_grad
    assert all(isinstance(model.layer[i].value, LoraLinear) for i in range(2))
    assert not model.layer[0].value.base_layer.weight.requires_grad
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"layer.{i}.{m}.lora_{f}" for i in range(2) for m in ("query", "value") for f in "AB"} | {
        "classifier.weight",
        "classifier.bias",
    }
    pytest.importorskip("safetensors")
    lora_fast.save_adapter(model, tmp_path)
    import json

    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]


def test_modules_to_save_as_one_string() -> None:  # 4.11
    model = lora_fast.inject(Model(), ["query"], modules_to_save="classifier")
    assert model.classifier.weight.requires_grad


def test_patterns_apply_with_peft_semantics() -> None:
    model = lora_fast.inject(
        Model(),
        ["query", "value"],
        r=8,
        alpha=16,
        rank_pattern={r"layer\.1\.value": 2, "value": 4},
        alpha_pattern={"query": 4},
        use_rslora=True,
    )
    assert model.layer[0].value.r == 4 and model.layer[1].value.r == 2 and model.layer[0].query.r == 8
    assert model.layer[0].query.scaling == pytest.approx(4 / math.sqrt(8))
