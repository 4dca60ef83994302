"""lora_fast.adapters: every format read with PEFT's scaling, and damaged input named (bad-input rows 2.x)."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from _adapter_cases import Toy
from _adapter_cases import peft_adapter
from _adapter_cases import peft_deltas
from _adapter_cases import randomise
from _adapter_cases import sigma_of
from _adapter_cases import tiny_bert
from safetensors.torch import load_file
from safetensors.torch import save_file

from lora_fast.adapters import AdapterError
from lora_fast.adapters import find_pairs
from lora_fast.adapters import read_adapter
from lora_fast.energy_rank import analyze

W, C = "adapter_model.safetensors", "adapter_config.json"
PATTERNS = dict(r=8, lora_alpha=16, rank_pattern={"value": 4}, alpha_pattern={"query": 24})


def assert_spectra_match(records, deltas: dict[str, torch.Tensor]) -> None:
    assert {rec.name for rec in records} == set(deltas)
    for rec in records:
        ref = sigma_of(deltas[rec.name])[: rec.sigma.numel()]
        torch.testing.assert_close(rec.sigma.double(), ref, rtol=1e-5, atol=1e-6 * float(ref[0]))


@pytest.fixture
def good(tmp_path: Path) -> Path:
    peft_adapter(tmp_path / "good", target_modules=["query", "value"], **PATTERNS)
    return tmp_path / "good"


def damaged(good: Path, name: str) -> Path:
    folder = good.parent / name
    shutil.copytree(good, folder)
    return folder


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_folder_with_patterns_and_rslora(tmp_path: Path, use_rslora: bool) -> None:
    model = peft_adapter(
        tmp_path, target_modules=["query", "value", "dense"], use_rslora=use_rslora, modules_to_save=["classifier"]
    )
    deltas = peft_deltas(model)
    records = analyze(tmp_path)
    assert_spectra_match(records, deltas)
    adapter = read_adapter(tmp_path)
    assert adapter.format == "peft" and not adapter.dora
    assert any("classifier" in key for key in adapter.other_keys())
    peft_modules = {
        n.removeprefix("base_model.model."): m
        for n, m in model.named_modules()
        if isinstance(getattr(m, "scaling", None), dict)
    }
    for pair in adapter.pairs:
        assert pair.scaling == pytest.approx(peft_modules[pair.name].scaling["default"])


def test_bin_weights_and_bare_file_with_config_or_alpha(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=4, lora_alpha=12, target_modules=["query"]))
    randomise(model)
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "adapter_model.bin").exists()
    assert_spectra_match(analyze(tmp_path / "bin"), peft_deltas(model))

    bare = tmp_path / "bare.safetensors"
    model.save_pretrained(tmp_path / "st")
    shutil.copy(tmp_path / "st" / W, bare)
    assert_spectra_match(analyze(bare, config=tmp_path / "st" / C), peft_deltas(model))
    assert all(p.scaling == pytest.approx(3.0) for p in find_pairs(bare, alpha=12))
    with pytest.warns(UserWarning, match="scaling = 1.0"):
        assert all(p.scaling == 1.0 for p in find_pairs(bare))


def test_named_adapters_in_one_folder(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query"]))
    model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=6, target_modules=["value"]))
    randomise(model)
    model.save_pretrained(tmp_path)
    assert {p.r for p in read_adapter(tmp_path).pairs} == {4}
    other = read_adapter(tmp_path, adapter_name="other")
    assert {p.r for p in other.pairs} == {2} and all(p.name.endswith("value") for p in other.pairs)
    assert_spectra_match(analyze(tmp_path, adapter_name="other"), peft_deltas(model, "other"))
    with pytest.raises(AdapterError, match=r"no adapter named 'nope'.*other"):
        read_adapter(tmp_path, adapter_name="nope")
    os.remove(tmp_path / W)
    with pytest.raises(AdapterError, match="named adapters other"):
        read_adapter(tmp_path)
    # in-memory keys carry adapter names: select one, or get all
    state = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert {p.adapter for p in find_pairs(state, config={"lora_alpha": 8})} == {"default", "other"}
    assert {p.adapter for p in find_pairs(state, config={"lora_alpha": 8}, adapter_name="other")} == {"other"}


def test_conv_and_embedding_lora(tmp_path: Path) -> None:
    model = peft_adapter(tmp_path, Toy(), r=4, lora_alpha=8, target_modules=["emb", "conv", "lin"])
    deltas = peft_deltas(model)
    records = {rec.name: rec for rec in analyze(tmp_path)}
    assert records["conv"].shape == (20, 27) and records["emb"].shape == (24, 50)  # emb: ΔWᵀ = s·B·A
    assert_spectra_match(records.values(), deltas)
    layouts = {p.name: p.layout for p in read_adapter(tmp_path).pairs}
    assert layouts == {"emb": "embedding", "conv": "conv", "layers.0.lin": "linear", "layers.1.lin": "linear"}


def test_adalora_file(tmp_path: Path) -> None:
    model = peft_adapter(tmp_path, init_r=6, target_r=3, lora_alpha=12, target_modules=["query"], total_step=10)
    records = analyze(tmp_path)
    assert_spectra_match(records, peft_deltas(model))
    assert all(rec.r == 6 for rec in records)


def test_dora_is_flagged(tmp_path: Path) -> None:
    peft_adapter(tmp_path, r=4, lora_alpha=8, target_modules=["query"], use_dora=True)
    records = analyze(tmp_path)
    assert records and all(rec.dora for rec in records)
    assert "lora_magnitude_vector" in " ".join(read_adapter(tmp_path).other_keys())


def kohya_file(path: Path, with_alpha: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    state = {}
    for i in range(2):
        name = f"lora_te_text_model_encoder_layers_{i}_self_attn_q_proj"
        state[f"{name}.lora_down.weight"] = torch.randn(4, 32, generator=g)
        state[f"{name}.lora_up.weight"] = torch.randn(48, 4, generator=g)
        if with_alpha:
            state[f"{name}.alpha"] = torch.tensor(2.0)
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    state[f"{conv}.lora_down.weight"] = torch.randn(3, 8, 3, 3, generator=g)
    state[f"{conv}.lora_up.weight"] = torch.randn(16, 3, 1, 1, generator=g)
    if with_alpha:
        state[f"{conv}.alpha"] = torch.tensor(1.5, dtype=torch.float16)
    save_file(state, path)
    return state


@pytest.mark.parametrize("with_alpha", [True, False])
def test_kohya_file(tmp_path: Path, with_alpha: bool) -> None:
    state = kohya_file(tmp_path / "style.safetensors", with_alpha)
    adapter = read_adapter(tmp_path / "style.safetensors")
    assert adapter.format == "kohya"
    records = {rec.name: rec for rec in analyze(adapter)}
    q = "lora_te_text_model_encoder_layers_1_self_attn_q_proj"
    assert (records[q].layer, records[q].kind, records[q].r) == (1, "self_attn_q_proj", 4)
    scale = 2.0 / 4 if with_alpha else 1.0
    ref = sigma_of(state[f"{q}.lora_up.weight"].double() @ state[f"{q}.lora_down.weight"].double()) * scale
    torch.testing.assert_close(records[q].sigma.double(), ref[:4], rtol=1e-5, atol=1e-6)
    conv = records["lora_unet_down_blocks_0_resnets_0_conv1"]
    assert conv.shape == (16, 72) and conv.scaling == pytest.approx(0.5 if with_alpha else 1.0)


def test_lora_fast_model_and_state_dict() -> None:
    import lora_fast

    model = lora_fast.inject(tiny_bert(), ["query"], r=4, alpha=8)
    randomise(model)
    records = analyze(model)
    assert len(records) == 3 and all(rec.scaling == 2.0 for rec in records)
    layer = model.bert.encoder.layer[0].attention.self.query
    ref = sigma_of(layer.delta_weight())
    torch.testing.assert_close(records[0].sigma.double(), ref[:4], rtol=1e-5, atol=1e-6)


# ---- damaged input (rows 2.2, 2.5–2.7, 2.11, 2.12, 2.14 and friends): the file and the field are named --------


def rewrite_config(folder: Path, change) -> None:
    config = json.loads((folder / C).read_text())
    change(config)
    (folder / C).write_text(json.dumps(config))


def test_invalid_json_names_file_and_position(good: Path) -> None:
    folder = damaged(good, "j")
    (folder / C).write_text('{"r": 4,')
    with pytest.raises(AdapterError, match=rf"{folder / C}: invalid JSON at line 1, column 9"):
        analyze(folder)


def test_config_that_is_a_list(good: Path) -> None:
    folder = damaged(good, "l")
    (folder / C).write_text("[1, 2]")
    with pytest.raises(AdapterError, match=rf"{folder / C}: a LoRA config must be a JSON object, got list"):
        analyze(folder)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda c: c.update(lora_alpha=None), "lora_alpha must be a number, got None"),
        (lambda c: c.update(lora_alpha="sixteen"), "lora_alpha must be a number, got 'sixteen'"),
        (lambda c: c.update(alpha_pattern={"query(": 4}), r"alpha_pattern key 'query\(' is not a valid regular"),
        (lambda c: c.update(rank_pattern={"value": "4"}), r"rank_pattern\['value'\] must be a positive int"),
    ],
)
def test_bad_config_fields_are_named(good: Path, change, match) -> None:
    folder = damaged(good, "n")
    rewrite_config(folder, change)
    with pytest.raises(AdapterError, match=match) as info:
        analyze(folder)
    assert str(folder / C) in str(info.value)


def test_swapped_factor_shapes_are_checked_against_the_config_rank(good: Path) -> None:
    folder = damaged(good, "s")
    state = load_file(folder / W)
    key = next(k for k in state if k.endswith("query.lora_A.weight"))
    state[key], state[key.replace("lora_A", "lora_B")] = torch.randn(32, 8), torch.randn(8, 32)
    save_file(state, folder / W)
    with pytest.raises(AdapterError, match=r"\(rank 32\), but the config gives .*query' rank 8 \(field r\)"):
        analyze(folder)
    # rank_pattern is named when it decided the expected rank
    state = load_file(good / W)
    key = next(k for k in state if k.endswith("value.lora_A.weight"))
    state[key], state[key.replace("lora_A", "lora_B")] = torch.randn(8, 32), torch.randn(32, 8)
    save_file(state, folder / W)
    with pytest.raises(AdapterError, match=r"rank 4 \(field rank_pattern\)"):
        analyze(folder)


def test_one_dimensional_factor(good: Path) -> None:
    folder = damaged(good, "o")
    state = load_file(folder / W)
    key = next(k for k in state if "lora_A" in k)
    state[key] = torch.randn(128)
    save_file(state, folder / W)
    with pytest.raises(AdapterError, match=rf"{folder / W}: {key} has shape \(128,\); a LoRA factor must be 2-D"):
        analyze(folder)


def test_weights_path_is_a_directory(good: Path) -> None:
    folder = damaged(good, "x")
    os.remove(folder / W)
    os.mkdir(folder / W)
    with pytest.raises(AdapterError, match=rf"{folder / W}: is a directory"):
        analyze(folder)


@pytest.mark.parametrize("damage", ["zero header", "half", "empty", "text"])
def test_corrupt_weights_name_the_file(good: Path, damage: str) -> None:
    folder = damaged(good, damage.replace(" ", "_"))
    data = (folder / W).read_bytes()
    content = {
        "zero header": b"\0" * 16 + data[16:],
        "half": data[: len(data) // 2],
        "empty": b"",
        "text": b"hello, this is not safetensors",
    }[damage]
    (folder / W).write_bytes(content)
    with pytest.raises(AdapterError, match=rf"{folder / W}: "):
        analyze(folder)


def test_other_bad_inputs(good: Path, tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="no such file or folder"):
        analyze(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="no adapter weights"):
        analyze(tmp_path / "empty")
    save_file({"bert.embeddings.word_embeddings.weight": torch.randn(4, 4)}, tmp_path / "model.safetensors")
    with pytest.raises(AdapterError, match="found no LoRA pairs"):
        analyze(tmp_path / "model.safetensors")
    folder = damaged(good, "partner")
    state = load_file(folder / W)
    del state[next(k for k in state if "lora_B" in k)]
    save_file(state, folder / W)
    with pytest.raises(AdapterError, match="has no partner lora_B"):
        analyze(folder)
    folder = damaged(good, "inner")
    state = load_file(folder / W)
    key = next(k for k in state if k.endswith("query.lora_B.weight"))
    state[key] = torch.randn(32, 5)
    save_file(state, folder / W)
    with pytest.raises(AdapterError, match=r"inner ranks differ"):
        analyze(folder)
    folder = damaged(good, "nan")
    state = load_file(folder / W)
    key = next(k for k in state if k.endswith("layer.1.attention.self.query.lora_A.weight"))
    state[key][0, 0] = math.nan
    save_file(state, folder / W)
    with pytest.raises(ValueError, match=r"layer\.1\.attention\.self\.query' contains NaN or Inf"):
        analyze(folder)


def test_overlapping_pattern_keys_take_ranks_from_the_weights(tmp_path: Path) -> None:
    # PEFT's save_pretrained sorts pattern keys, so "layer\.2\..*" now comes first although "value" decided
    model = peft_adapter(
        tmp_path, target_modules=["query", "value"], r=8, lora_alpha=16, rank_pattern={"value": 4, r"layer\.2\..*": 6}
    )
    assert list(json.loads((tmp_path / C).read_text())["rank_pattern"]) == [r"layer\.2\..*", "value"]
    with pytest.warns(UserWarning, match="several rank_pattern/alpha_pattern keys match 1 module"):
        records = analyze(tmp_path)
    assert_spectra_match(records, peft_deltas(model))


def test_alpha_beside_a_config_is_ignored_with_a_warning(good: Path) -> None:
    with pytest.warns(UserWarning, match="alpha=3 ignored"):
        pairs = read_adapter(good, alpha=3).pairs
    assert {p.scaling for p in pairs} == {24 / 8, 16 / 4}  # from the config (alpha_pattern query: 24, value r=4)
