"""lora_fast.shrink: every written ΔW is the float64 Eckart–Young truncation of the original, and PEFT loads it."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from _adapter_cases import Toy
from _adapter_cases import best_rank
from _adapter_cases import peft_adapter
from _adapter_cases import peft_deltas
from _adapter_cases import sigma_of
from _adapter_cases import tiny_bert
from safetensors.torch import load_file
from safetensors.torch import save_file

from lora_fast.adapters import AdapterError
from lora_fast.adapters import read_adapter
from lora_fast.energy_rank import energy_rank
from lora_fast.shrink import plan_ranks
from lora_fast.shrink import shrink

peft = pytest.importorskip("peft")
W, C = "adapter_model.safetensors", "adapter_config.json"
TOL = 1e-5  # relative Frobenius error of each written ΔW against the float64 truncation (measured: ~2e-7)


def reload(folder: Path, model=None):
    return peft.PeftModel.from_pretrained(model if model is not None else tiny_bert(), folder).eval()


def assert_truncations(original: dict, shrunk: dict, ranks: dict | None = None) -> dict[str, int]:
    """Every shrunk ΔW equals the best rank-j approximation of the original's; returns j per module."""
    got = {}
    for name, delta in original.items():
        if name not in shrunk:
            got[name] = 0
            continue
        new = shrunk[name]
        # PEFT forms ΔW in float32: its rounding noise sits ~1e-7 below σ_max
        j = int(torch.linalg.matrix_rank(new.reshape(new.shape[0], -1), rtol=1e-5))
        ref = best_rank(delta, j)
        err = float((new - ref).norm() / ref.norm())
        assert err < TOL, (name, j, err)
        got[name] = j
    if ranks is not None:
        assert got == ranks
    return got


@pytest.mark.parametrize("use_rslora", [False, True])
def test_threshold_shrink_loads_in_peft_with_patterns_rslora_and_modules_to_save(tmp_path: Path, use_rslora) -> None:
    model = peft_adapter(
        tmp_path / "src",
        target_modules=["query", "value", "dense"],
        r=8,
        lora_alpha=16,
        rank_pattern={"value": 4, r"layer\.2\.attention\.self\.query": 6},
        alpha_pattern={"query": 24},
        use_rslora=use_rslora,
        modules_to_save=["classifier"],
    )
    original = peft_deltas(model)
    result = shrink(tmp_path / "src", tmp_path / "out", threshold=0.8)
    theirs = reload(tmp_path / "out")
    expected = {name: int(energy_rank(sigma_of(d), 0.8)) for name, d in original.items()}
    assert assert_truncations(original, peft_deltas(theirs), expected) == {m.name: m.rank for m in result.modules}
    config = json.loads((tmp_path / "out" / C).read_text())
    assert config["use_rslora"] is use_rslora and config["modules_to_save"] == ["classifier"]
    # every module keeps its scaling
    scalings = {
        n.removeprefix("base_model.model."): m.scaling["default"]
        for n, m in theirs.named_modules()
        if isinstance(getattr(m, "scaling", None), dict)
    }
    for module in result.modules:
        assert scalings[module.name] == pytest.approx(module.scaling)
    saved = load_file(tmp_path / "src" / W)
    written = load_file(tmp_path / "out" / W)
    for key in (k for k in saved if "classifier" in k):
        assert torch.equal(saved[key], written[key])
    # reported error and kept energies agree with the spectra
    total = sum(float(sigma_of(d).square().sum()) for d in original.values())
    lost = sum(float(sigma_of(d)[expected[n] :].square().sum()) for n, d in original.items())
    assert result.relative_error == pytest.approx((lost / total) ** 0.5, rel=1e-6)
    assert all(m.kept >= 0.8 - 1e-12 for m in result.modules)
    assert result.params_after < result.params_before and result.file_bytes == (tmp_path / "out" / W).stat().st_size


def test_rank_shrink_keeps_untouched_modules_bit_for_bit(tmp_path: Path) -> None:
    model = peft_adapter(
        tmp_path / "src", target_modules=["query", "value"], r=8, lora_alpha=8, rank_pattern={"value": 3}
    )
    shrink(tmp_path / "src", tmp_path / "out", rank=4)
    saved, written = load_file(tmp_path / "src" / W), load_file(tmp_path / "out" / W)
    for key in (k for k in saved if ".value." in k):
        assert torch.equal(saved[key], written[key])
    ranks = assert_truncations(peft_deltas(model), peft_deltas(reload(tmp_path / "out")))
    assert {j for n, j in ranks.items() if "query" in n} == {4} and {j for n, j in ranks.items() if "value" in n} == {3}


def test_params_budget_is_greedy_over_all_sigma(tmp_path: Path) -> None:
    model = peft_adapter(tmp_path / "src", target_modules=["query", "value", "dense"], r=8, lora_alpha=16)
    original = peft_deltas(model)
    budget = 3000
    result = shrink(tmp_path / "src", tmp_path / "out", params=budget)
    assert result.params_after <= budget
    ranks = assert_truncations(original, peft_deltas(reload(tmp_path / "out")))
    cost = {n: sum(d.reshape(d.shape[0], -1).shape) for n, d in original.items()}
    assert sum(j * cost[n] for n, j in ranks.items()) == result.params_after
    # nothing left out would fit and buys more σ² per parameter than the cheapest thing kept
    kept_ratio = min(float(sigma_of(d)[ranks[n] - 1] ** 2) / cost[n] for n, d in original.items() if ranks[n])
    left = budget - result.params_after
    for name, delta in original.items():
        sigma = sigma_of(delta)
        if ranks[name] < 8 and cost[name] <= left:
            assert float(sigma[ranks[name]] ** 2) / cost[name] <= kept_ratio + 1e-12


def test_plan_ranks_with_equal_costs_keeps_the_largest_sigmas() -> None:
    g = torch.Generator().manual_seed(0)
    sigmas = [torch.rand(r, generator=g, dtype=torch.float64).sort(descending=True).values for r in (5, 3, 8, 1)]
    everything = torch.cat(sigmas).sort(descending=True).values
    for k in range(0, 18):
        ranks = plan_ranks(sigmas, [10] * 4, budget=10 * k)
        kept = sum(float(s[:j].square().sum()) for s, j in zip(sigmas, ranks, strict=True))
        assert sum(ranks) == k and kept == pytest.approx(float(everything[:k].square().sum()))
    assert plan_ranks(sigmas, [1] * 4, rank=4) == [4, 3, 4, 1]
    assert plan_ranks([torch.zeros(3)], [1], threshold=0.9) == [0]
    with pytest.raises(ValueError, match="exactly one"):
        plan_ranks(sigmas, [1] * 4, rank=2, threshold=0.9)


def test_size_budget(tmp_path: Path) -> None:
    peft_adapter(
        tmp_path / "src", target_modules=["query", "value", "dense"], r=8, lora_alpha=16, modules_to_save=["classifier"]
    )
    full = (tmp_path / "src" / W).stat().st_size
    size_mb = full * 0.5 / 1e6
    result = shrink(tmp_path / "src", tmp_path / "out", size_mb=size_mb)
    assert result.file_bytes <= size_mb * 1e6 and result.params_after < result.params_before
    with pytest.raises(AdapterError, match="leaves no room"):
        shrink(tmp_path / "src", tmp_path / "tiny", size_mb=1e-4)
    assert not (tmp_path / "tiny").exists()


def test_dropped_modules_leave_target_modules_as_full_names(tmp_path: Path) -> None:
    model = peft_adapter(tmp_path / "src", target_modules=["query", "value"], r=4, lora_alpha=4, seed=3)
    with torch.no_grad():  # two modules carry almost nothing: a small budget drops them
        for name, module in model.named_modules():
            if name.endswith("layer.0.attention.self.value") or name.endswith("layer.1.attention.self.value"):
                module.lora_B["default"].weight.mul_(1e-4)
    model.save_pretrained(tmp_path / "src")
    original = peft_deltas(model)
    result = shrink(tmp_path / "src", tmp_path / "out", params=4 * 64 * 4)
    dropped = {m.name for m in result.modules if m.rank == 0}
    assert "bert.encoder.layer.0.attention.self.value" in dropped
    config = json.loads((tmp_path / "out" / C).read_text())
    assert sorted(config["target_modules"]) == sorted(set(original) - dropped)
    shrunk = peft_deltas(reload(tmp_path / "out"))
    assert set(shrunk) == set(original) - dropped
    assert_truncations(original, shrunk)


def test_conv_embedding_and_adalora(tmp_path: Path) -> None:
    toy = peft_adapter(tmp_path / "toy", Toy(), r=6, lora_alpha=12, target_modules=["emb", "conv", "lin", "out"])
    shrink(tmp_path / "toy", tmp_path / "toy_out", rank=3)
    torch.manual_seed(0)
    assert_truncations(peft_deltas(toy), peft_deltas(reload(tmp_path / "toy_out", Toy())), None)

    ada = peft_adapter(tmp_path / "ada", init_r=6, target_r=3, lora_alpha=12, target_modules=["query"], total_step=10)
    shrink(tmp_path / "ada", tmp_path / "ada_out", threshold=0.9)
    config = json.loads((tmp_path / "ada_out" / C).read_text())
    assert config["peft_type"] == "LORA"
    assert_truncations(peft_deltas(ada), peft_deltas(reload(tmp_path / "ada_out")))


def test_kohya_in_kohya_out(tmp_path: Path) -> None:
    from test_adapters import kohya_file

    state = kohya_file(tmp_path / "style.safetensors")
    result = shrink(tmp_path / "style.safetensors", tmp_path / "out", rank=2)
    written = load_file(tmp_path / "out" / "style.safetensors")
    for module in result.modules:
        down, up = written[f"{module.name}.lora_down.weight"], written[f"{module.name}.lora_up.weight"]
        assert down.shape[0] == 2 and up.shape[1] == 2
        scale = float(written[f"{module.name}.alpha"]) / 2
        new = up.flatten(1).double() @ down.flatten(1).double() * scale
        old_scale = float(state[f"{module.name}.alpha"]) / state[f"{module.name}.lora_down.weight"].shape[0]
        old = (
            state[f"{module.name}.lora_up.weight"].flatten(1).double()
            @ state[f"{module.name}.lora_down.weight"].flatten(1).double()
        )
        ref = best_rank(old * old_scale, 2)
        assert float((new - ref).norm() / ref.norm()) < TOL
        assert written[f"{module.name}.alpha"].dtype == state[f"{module.name}.alpha"].dtype


def test_ill_conditioned_rank_deficient_and_zero_factors(tmp_path: Path) -> None:
    model = peft_adapter(tmp_path / "src", target_modules=["query", "value", "key"], r=8, lora_alpha=8)
    with torch.no_grad():
        layers = model.base_model.model.bert.encoder.layer
        layers[0].attention.self.query.lora_B["default"].weight[:, 3] = 0  # rank-deficient B
        b = layers[1].attention.self.query.lora_B["default"].weight
        b.copy_(b * torch.logspace(0, -6, 8))  # columns over 6 decades: equilibration keeps the Gram route
        a = layers[2].attention.self.query.lora_A["default"].weight
        a[4:] = a[:4] + 1e-7 * torch.randn(4, 32)  # nearly dependent rows: cond ~1e7, Householder route
        layers[0].attention.self.value.lora_B["default"].weight.zero_()  # PEFT's untrained B
    model.save_pretrained(tmp_path / "src")
    original = peft_deltas(model)
    result = shrink(tmp_path / "src", tmp_path / "out", rank=5)
    ranks = {m.name: m.rank for m in result.modules}
    assert ranks["bert.encoder.layer.0.attention.self.value"] == 5  # kept as asked, ΔW = 0 either way
    shrunk = peft_deltas(reload(tmp_path / "out"))
    for name, delta in original.items():
        if name.endswith("layer.0.attention.self.value"):
            assert float(shrunk[name].abs().max()) == 0.0
            continue
        ref = best_rank(delta, 5)
        assert float((shrunk[name] - ref).norm() / ref.norm()) < TOL, name


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtypes_are_kept(tmp_path: Path, dtype: torch.dtype) -> None:
    model = peft_adapter(tmp_path / "src", target_modules=["query"], r=6, lora_alpha=6)
    state = {k: v.to(dtype) for k, v in load_file(tmp_path / "src" / W).items()}
    save_file(state, tmp_path / "src" / W)
    shrink(tmp_path / "src", tmp_path / "out", rank=2)
    written = load_file(tmp_path / "out" / W)
    assert {v.dtype for v in written.values()} == {dtype}
    if dtype == torch.float64:
        for name in peft_deltas(model):
            key = f"base_model.model.{name}"
            new = written[f"{key}.lora_B.weight"] @ written[f"{key}.lora_A.weight"]
            ref = best_rank(state[f"{key}.lora_B.weight"] @ state[f"{key}.lora_A.weight"], 2)
            assert float((new - ref).norm() / ref.norm()) < 1e-12  # float64 in, float64 products


def test_refusals_write_nothing(tmp_path: Path) -> None:
    peft_adapter(tmp_path / "dora", target_modules=["query"], r=4, lora_alpha=8, use_dora=True)
    with pytest.raises(AdapterError, match="DoRA"):
        shrink(tmp_path / "dora", tmp_path / "o1", rank=2)
    peft_adapter(tmp_path / "src", target_modules=["query"], r=4, lora_alpha=8)
    bare = tmp_path / "bare.safetensors"
    bare.write_bytes((tmp_path / "src" / W).read_bytes())
    with pytest.raises(AdapterError, match="give a config or an alpha"):
        shrink(bare, tmp_path / "o2", rank=2)
    shrink(bare, tmp_path / "o3", rank=2, alpha=8)
    assert json.loads((tmp_path / "o3" / C).read_text())["target_modules"]
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        shrink(tmp_path / "src", tmp_path / "exists", rank=2)
    assert [p.name for p in (tmp_path / "exists").iterdir()] == ["keep.txt"]
    shrink(tmp_path / "src", tmp_path / "exists", rank=2, force=True)
    assert sorted(p.name for p in (tmp_path / "exists").iterdir()) == [C, W]
    for bad in (dict(threshold=0), dict(threshold=1.5), dict(rank=0), dict(params=0), dict(size_mb=-1), {}):
        with pytest.raises(ValueError):
            shrink(tmp_path / "src", tmp_path / "o4", **bad)
    assert not any(p.name.startswith((".o", "o1", "o2", "o4")) for p in tmp_path.iterdir())


def test_shrinking_in_place_with_force(tmp_path: Path) -> None:
    model = peft_adapter(tmp_path / "src", target_modules=["query"], r=4, lora_alpha=8)
    original = peft_deltas(model)
    shrink(tmp_path / "src", tmp_path / "src", rank=2, force=True)
    assert_truncations(original, peft_deltas(reload(tmp_path / "src")))
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


def test_many_modules_of_several_shapes_batch_correctly(tmp_path: Path) -> None:
    # more modules than one batched chunk, mixed shapes and ranks
    g = torch.Generator().manual_seed(0)
    state, config = {}, {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "rank_pattern": {}, "target_modules": []}
    for i, (m, n, r) in enumerate(itertools.islice(itertools.cycle([(40, 24, 4), (24, 40, 4), (33, 17, 7)]), 150)):
        name = f"blocks.{i}.proj"
        state[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, n, generator=g)
        state[f"base_model.model.{name}.lora_B.weight"] = torch.randn(m, r, generator=g)
        config["target_modules"].append(name)
        if r != 4:
            config["rank_pattern"][name] = r
    (tmp_path / "src").mkdir()
    save_file(state, tmp_path / "src" / W)
    (tmp_path / "src" / C).write_text(json.dumps(config))
    result = shrink(tmp_path / "src", tmp_path / "out", threshold=0.7)
    written = load_file(tmp_path / "out" / W)
    adapter = read_adapter(tmp_path / "src")
    for pair, module in zip(adapter.pairs, result.modules, strict=True):
        key = f"base_model.model.{pair.name}"
        new = written[f"{key}.lora_B.weight"].double() @ written[f"{key}.lora_A.weight"].double()
        ref = best_rank(pair.B.double() @ pair.A.double(), module.rank)
        assert new.shape == ref.shape and float((new - ref).norm() / ref.norm()) < TOL
