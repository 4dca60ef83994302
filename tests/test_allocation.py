from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import _adapter_cases
import pytest
import torch

from lora_fast import allocation as al
from lora_fast.injection import inject
from lora_fast.injection import lora_modules

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
LAYERS = 6


def tiny_bert(seed: int = 0) -> torch.nn.Module:
    return _adapter_cases.tiny_bert(
        seed,
        vocab_size=97,
        hidden_size=24,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        intermediate_size=40,
        max_position_embeddings=32,
    )


def batch(seed: int = 0, n: int = 4, length: int = 7) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, 97, (n, length), generator=gen),
        "labels": torch.randint(0, 3, (n,), generator=gen),
    }


def warmed_up_pattern() -> dict[str, int]:
    model = inject(tiny_bert(), TARGETS, r=4)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        model(**batch(step)).loss.backward()
        opt.step()
        opt.zero_grad()
    return al.warmup_importance(model, [batch(10), batch(11)], r_min=2, r_max=12)


def all_patterns(tmp_path) -> dict[str, dict[str, int]]:
    targets = al.find_targets(tiny_bert(), TARGETS)
    layer_file = tmp_path / "ranks.json"
    layer_file.write_text(json.dumps({"ranks": [3, 1, 4, 1, 5, 9]}))
    energy = {t.name: 1 + (i * 7) % 6 for i, t in enumerate(targets)}
    return {
        "uniform8": al.uniform(targets, 8),
        "linear_decay": al.linear_decay(targets),
        "attention_heavy": al.attention_heavy(targets),
        "empirical": al.empirical(targets),
        "layer_list": al.load_layer_list(targets, layer_file),
        "warmup_importance": warmed_up_pattern(),
        "energy_guided": al.energy_guided(targets, energy, budget_rank=8),
    }


def trainable_per_module(model: torch.nn.Module, prefix: str = "") -> dict[str, int]:
    """Trainable LoRA parameters of each adapted module, by the module's name in the bare model."""
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad or "lora_" not in name:
            continue
        module = name.split(".lora_")[0].removeprefix(prefix)
        counts[module] = counts.get(module, 0) + p.numel()
    return counts


def test_find_targets_names_layers_and_shapes():
    targets = al.find_targets(tiny_bert(), TARGETS)
    assert len(targets) == 6 * LAYERS  # pooler.dense and the classifier are not matched
    assert al.num_layers(targets) == LAYERS
    by_name = {t.name: t for t in targets}
    ffn_in = by_name["bert.encoder.layer.5.intermediate.dense"]
    assert (ffn_in.layer, ffn_in.in_features, ffn_in.out_features) == (5, 24, 40)
    assert by_name["bert.encoder.layer.2.attention.output.dense"].kind == "attention.output.dense"
    with pytest.raises(ValueError):
        al.find_targets(tiny_bert(), ["nonexistent"])


def test_fixed_strategies_follow_their_definitions():
    targets = al.find_targets(tiny_bert(), TARGETS)
    decay = al.linear_decay(targets, 16, 4)
    assert decay["bert.encoder.layer.0.attention.self.query"] == 16
    assert decay["bert.encoder.layer.5.output.dense"] == 4
    assert decay["bert.encoder.layer.3.output.dense"] == round(16 - 12 * 3 / 5)
    emp = al.empirical(targets, r=10)
    # 6 blocks: 0-1 early (60%), 2-3 middle (120%), 4-5 late (100%)
    assert [emp[f"bert.encoder.layer.{i}.attention.self.value"] for i in range(6)] == [6, 6, 12, 12, 10, 10]
    heavy = al.attention_heavy(targets, 16, 4)
    assert heavy["bert.encoder.layer.1.attention.output.dense"] == 16
    assert heavy["bert.encoder.layer.1.intermediate.dense"] == 4
    with pytest.raises(ValueError):
        al.from_layer_list(targets, [8] * (LAYERS - 1))


def test_scores_to_ranks_and_importance():
    scores = al.importance_scores({"a": 2.0, "b": 1.0, "c": 0.0}, {"a": 0.0, "b": 4.0, "c": 2.0}, 0.5, 0.5)
    assert scores == pytest.approx({"a": 0.5, "b": 0.75, "c": 0.25})
    assert al.scores_to_ranks(scores, 4, 16) == {"a": 10, "b": 16, "c": 4}


def test_fit_budget_stays_within_budget_and_is_monotone():
    targets = al.find_targets(tiny_bert(), TARGETS)
    weights = {t.name: float((i * 5) % 7) + 0.5 for i, t in enumerate(targets)}
    budget = al.lora_param_count(targets, al.uniform(targets, 8))
    ranks = al.fit_budget(targets, weights, budget, r_min=2, r_max=20)
    cost = al.lora_param_count(targets, ranks)
    assert cost <= budget
    assert budget - cost < max(t.params_per_rank() for t in targets)  # no whole unit of rank left unspent
    assert all(2 <= r <= 20 for r in ranks.values())
    # same shape, larger weight -> rank at least as large (up to the one greedy top-up unit)
    same_shape = [t for t in targets if t.kind == "query"]
    for a in same_shape:
        for b in same_shape:
            if weights[a.name] > weights[b.name]:
                assert ranks[a.name] + 1 >= ranks[b.name]
    with pytest.raises(ValueError):
        al.fit_budget(targets, weights, budget=10, r_min=1)


def test_rank_patterns_give_the_counted_trainable_parameters_in_lora_fast_and_peft(tmp_path):
    """Every strategy's pattern, applied by lora_fast.inject and by PEFT, trains exactly r·(k+n) per module."""
    for strategy, pattern in all_patterns(tmp_path).items():
        targets = al.find_targets(tiny_bert(), TARGETS)
        expected = {t.name: pattern[t.name] * (t.in_features + t.out_features) for t in targets}
        assert len(set(pattern.values())) > 1 or strategy == "uniform8", strategy

        ours = inject(tiny_bert(), TARGETS, r=1, rank_pattern=pattern)
        assert trainable_per_module(ours) == expected, strategy

        config = peft.LoraConfig(target_modules=TARGETS, r=1, rank_pattern=pattern)
        theirs = peft.get_peft_model(tiny_bert(), config)
        assert trainable_per_module(theirs, "base_model.model.") == expected, strategy
        assert sum(expected.values()) == al.lora_param_count(targets, pattern)


def test_gradient_norms_match_autograd_of_the_base_weight():
    model = inject(tiny_bert(), TARGETS, r=4)
    with torch.no_grad():
        for layer in lora_modules(model).values():
            layer.lora_B.normal_(std=0.1)
    batches = [batch(1), batch(2)]
    norms = al.gradient_norms(model, batches)
    for layer in lora_modules(model).values():
        layer.base_layer.weight.requires_grad_(True)
    for b in batches:
        model(**b).loss.backward()
    for name, layer in lora_modules(model).items():
        assert norms[name] == pytest.approx(float(layer.base_layer.weight.grad.norm()), rel=1e-4, abs=1e-8)
    assert len({round(v, 6) for v in norms.values()}) > 1


@pytest.mark.parametrize("new_r", [2, 4, 9])
def test_resize_adapters_keeps_the_update(new_r):
    model = inject(tiny_bert(), ["query"], r=4, alpha=8)
    name = "bert.encoder.layer.0.attention.self.query"
    layer = lora_modules(model)[name]
    with torch.no_grad():
        layer.lora_B.normal_()
    before = layer.delta_weight()
    al.resize_adapters(model, {name: new_r})
    assert layer.lora_A.shape == (new_r, 24) and layer.lora_B.shape == (24, new_r) and layer.r == new_r
    assert layer.scaling == pytest.approx(8 / new_r)
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    s_before = torch.linalg.svdvals(before)
    after = layer.delta_weight()
    if new_r >= 4:
        torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)
    else:  # best rank-r approximation: the top r singular values survive, the rest are gone
        torch.testing.assert_close(torch.linalg.svdvals(after)[:new_r], s_before[:new_r], atol=1e-5, rtol=1e-4)
        assert float(torch.linalg.svdvals(after)[new_r]) < 1e-5
        err = torch.linalg.matrix_norm(after - before)
        assert float(err) == pytest.approx(math.sqrt(float((s_before[new_r:] ** 2).sum())), rel=1e-3)


def test_adalora_baseline_prunes_to_the_target_budget():
    sys.path.append(str(Path(__file__).resolve().parents[1]))  # after site-packages: the installed lora_fast wins
    from experiments.baselines.adalora import adalora_config
    from experiments.baselines.adalora import adalora_ranks
    from experiments.baselines.adalora import adalora_step_hook

    total_step = 20
    targets = al.find_targets(tiny_bert(), ["query", "value"])
    config = adalora_config(["query", "value"], total_step, target_r=2, init_r=4, task_type="SEQ_CLS")
    model = peft.get_peft_model(tiny_bert(), config)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    remove = adalora_step_hook(model)
    try:
        for step in range(total_step):
            loss = model(**batch(step)).loss
            assert torch.isfinite(loss)
            loss.backward()
            opt.step()
            opt.zero_grad()
    finally:
        remove()
    ranks = adalora_ranks(model)
    assert set(ranks) == {t.name for t in targets}
    assert all(0 <= r <= 4 for r in ranks.values())
    # the budget is target_r per module on average; ties at the pruning threshold can keep a few more
    assert sum(ranks.values()) <= 4 * len(targets)
    assert abs(sum(ranks.values()) - 2 * len(targets)) <= 2


def test_strategies_touch_no_model():
    """strategies.py is pure: targets in, rank_pattern out (measurement and surgery live in measure.py)."""
    import ast

    source = Path(al.strategies.__file__).read_text()
    imported = {n.module for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Import) for a in n.names}
    assert not {"torch", "torch.nn", "lora_fast.layers", "lora_fast.injection"} & imported


@pytest.mark.parametrize("method", ["energy", "warmup"])
def test_reallocate_probes_scores_and_resizes_in_one_call(method):
    model = inject(tiny_bert(), TARGETS, r=4, alpha=8)
    targets = al.adapter_targets(model)
    assert len(targets) == 6 * LAYERS and {t.layer for t in targets} == set(range(LAYERS))
    assert {t.kind for t in targets} >= {"attention.self.query", "intermediate.dense", "output.dense"}
    budget = al.lora_param_count(targets, al.uniform(targets, 4))
    calls = []

    def probe(m):
        opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        for step in range(3):
            m(**batch(step)).loss.backward()
            opt.step()
            opt.zero_grad()
        calls.append({name: layer.delta_weight() for name, layer in lora_modules(m).items()})
        return "probe-result"

    done = al.reallocate(model, probe, method, r_min=2, r_max=8, batches=[batch(10)])
    assert len(calls) == 1 and done.probe_result == "probe-result" and done.method == method
    probed = calls[0]
    assert set(done.pattern) == set(probed) == set(done.scores) and done.budget == budget
    ranks = {name: layer.r for name, layer in lora_modules(model).items()}
    assert ranks == done.pattern and all(2 <= r <= 8 for r in ranks.values()) and len(set(ranks.values())) > 1
    if method == "energy":
        assert al.lora_param_count(targets, done.pattern) <= budget
        assert all(1 <= v <= 4 for v in done.scores.values())  # energy ranks of rank-4 adapters
    for name, layer in lora_modules(model).items():
        after = layer.delta_weight()
        if layer.r >= 4:  # grown adapters keep the probe's update; shrunk ones keep its top singular values
            torch.testing.assert_close(after, probed[name], atol=1e-5, rtol=1e-4)
        else:
            top = torch.linalg.svdvals(probed[name])[: layer.r]
            torch.testing.assert_close(torch.linalg.svdvals(after)[: layer.r], top, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="batches"):
        al.reallocate(inject(tiny_bert(), TARGETS, r=4), None, "warmup")
    with pytest.raises(ValueError, match="no lora_fast adapters"):
        al.reallocate(tiny_bert(), None)


# ---------------------------------------------------------------- suggest_ranks


def _teacher_task(classes: int, seed: int = 0) -> tuple[torch.nn.Module, object]:
    """A frozen 32 -> 32 layer under a frozen random head; labels come from a random C-way linear teacher, so the
    adapter on the layer must learn about C - 1 directions (the head cannot: it is frozen)."""
    from lora_fast.data import ClassificationData

    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, classes))
    x = torch.randn(512, 32, generator=gen)
    labels = (x @ torch.randn(32, classes, generator=gen)).argmax(dim=1)
    return model, ClassificationData("teacher", labels, tuple(map(str, range(classes))), inputs=x)


def test_suggest_ranks_follows_the_task_and_leaves_the_model_alone():
    from lora_fast.train import TrainConfig

    config = TrainConfig(lr=1e-2, batch_size=64, progress=False, device="cpu", precision="fp32", seed=0)
    found = {}
    for classes in (2, 12):
        model, data = _teacher_task(classes)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        found[classes] = al.suggest_ranks(model, data, ["0"], train_config=config, probe_rank=16, probe_steps=60)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the probe trained a copy
        assert not lora_modules(model)
    small, large = found[2], found[12]
    assert list(small.energy_ranks) == ["0"] and small.probe_steps == 60 and small.probe_metrics["steps"] == 60
    # a 2-way teacher needs ~1 direction of the layer, a 12-way one ~11
    assert small.energy_ranks["0"] < large.energy_ranks["0"]
    for s in (small, large):
        assert s.rank == al.round_rank(s.energy_ranks["0"]) and s.rank_pattern == {"0": s.rank}
        assert s.rank & (s.rank - 1) == 0 and s.uniform_estimate == s.energy_ranks["0"]
        assert "suggested uniform rank" in s.evidence()


def test_suggest_ranks_quantile_scale_cap_and_bad_arguments():
    from lora_fast.train import TrainConfig

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.Linear(8, 3))
    _, data = _teacher_task(3)
    data = type(data)("teacher", data.labels[:64], data.class_names, inputs=data.inputs[:64, :8])
    config = TrainConfig(lr=1e-2, batch_size=16, progress=False, device="cpu", precision="fp32")
    capped = al.suggest_ranks(model, data, ["0", "2"], train_config=config, probe_rank=1, probe_steps=2)
    assert capped.capped == ["0", "2"] and capped.rank == 1 and "probe again" in capped.evidence()
    s = al.suggest_ranks(model, data, ["0", "2"], train_config=config, probe_rank=8, probe_steps=4, quantile=1.0,
                         scale=0.5, r_min=2, modules_to_save=["3"])  # fmt: skip
    assert s.uniform_estimate == 0.5 * max(s.energy_ranks.values())
    assert all(2 <= r <= 8 and r == al.round_rank(0.5 * s.energy_ranks[n], 2, 8) for n, r in s.rank_pattern.items())
    assert [al.round_rank(v) for v in (0.2, 1, 1.5, 2, 3, 64)] == [1, 1, 2, 2, 4, 64]
    assert al.round_rank(65, 1, 64) == 64 and al.round_rank(1, 4) == 4
    bad_arguments = (
        ({"probe_rank": 0}, "probe_rank"),
        ({"threshold": 1.5}, "threshold"),
        ({"quantile": -0.1}, "quantile"),
        ({"scale": 0.0}, "scale"),
        ({"r_min": 9, "r_max": 4}, "r_min"),
    )
    for bad, match in bad_arguments:
        with pytest.raises(ValueError, match=match):
            al.suggest_ranks(model, data, ["0"], train_config=config, probe_steps=1, **bad)


def test_warmup_reallocation_fits_a_given_budget():
    torch.manual_seed(0)
    model = inject(tiny_bert(), TARGETS, r=4, alpha=8)
    targets = al.adapter_targets(model)
    budget = al.lora_param_count(targets, al.uniform(targets, 3))
    done = al.reallocate(model, None, "warmup", budget=budget, r_min=1, r_max=8, batches=[batch(10), batch(11)])
    spent = al.lora_param_count(targets, done.pattern)
    # fitted to the budget (within one rank of the widest module), unlike the linear map to [r_min, r_max]
    assert budget - max(t.params_per_rank() for t in targets) < spent <= budget
    top = max(done.scores, key=done.scores.get)
    assert done.pattern[top] == max(done.pattern.values())  # ranks follow the scores
