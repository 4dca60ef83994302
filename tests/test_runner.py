"""The experiment runner's machinery without a model: results store, claims, shards, worker count, statistics."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # after site-packages: the installed lora_fast (with _C) wins

from experiments.runner import analysis  # noqa: E402
from experiments.runner import store  # noqa: E402
from experiments.runner.pool import default_workers  # noqa: E402


def test_result_files_are_readable_like_other_outputs(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        store.atomic_write_json(tmp_path / "row.json", {"v": 1})
        holder = store.ResultStore(tmp_path / "out")
        holder.save_run("r1", {"v": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "row.json").stat().st_mode & 0o777 == 0o644
    assert holder.run_path("r1").stat().st_mode & 0o777 == 0o644


def test_shards_split_the_plan_deterministically() -> None:
    from experiments.runner.pool import parse_shard
    from experiments.runner.pool import shard_of
    from experiments.runner.spec import RunSpec

    specs = [RunSpec.make("s", f"r{i}", {"i": i}) for i in range(7)]
    parts = [shard_of(specs, (i, 3)) for i in range(3)]
    assert sorted(s.run_id for p in parts for s in p) == sorted(s.run_id for s in specs)
    assert [len(p) for p in parts] == [3, 2, 2] and parts[1] == shard_of(specs, parse_shard("1/3"))
    for bad in ("3/3", "-1/2", "1", "a/b"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)


def test_claimed_run_is_left_to_its_holder(tmp_path: Path) -> None:
    holder = store.ResultStore(tmp_path)
    claim = holder.claim("r1")
    assert claim is not None and holder.claim("r1") is None
    assert holder.claim("r2") is not None
    claim.release()
    assert not claim.path.exists()
    again = holder.claim("r1")
    assert again is not None
    again.release()


def test_atomic_write_keeps_old_file_on_failure(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "row.json"
    store.atomic_write_json(path, {"v": 1})

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(store.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        store.atomic_write_json(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["row.json"]  # no temporary file left behind


def test_fit_line_and_intervals() -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    x = np.linspace(0, 1, 20)
    covered = 0
    for _ in range(400):
        y = -3.0 * x + 2.0 + rng.normal(0, 0.5, x.size)
        fit = analysis.fit_line(x.tolist(), y.tolist())
        covered += fit["slope_lo"] < -3.0 < fit["slope_hi"] and fit["intercept_lo"] < 2.0 < fit["intercept_hi"]
    slope, intercept = np.polyfit(x, y, 1)
    assert fit["slope"] == pytest.approx(slope) and fit["intercept"] == pytest.approx(intercept)
    assert fit["r2"] == pytest.approx(np.corrcoef(x, y)[0, 1] ** 2) and fit["n"] == 20
    # two 95% intervals hold together in roughly 0.90-0.95 of samples; a wrong t quantile or SE misses this
    assert 0.86 < covered / 400 < 0.97
    assert analysis.ci_halfwidth(fit) == pytest.approx((fit["slope_hi"] - fit["slope_lo"]) / 2)
    assert np.isnan(analysis.fit_line([1.0, 1.0], [2.0, 3.0])["slope"])
    mean, half = analysis.mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(2.4841, abs=1e-3)  # t(0.975, 2) * 1 / sqrt(3)


def test_per_run_statistics_and_verdicts() -> None:
    adapters = [{"kind": "query", "layer": i, "energy_rank": r} for i, r in enumerate([4, 6, 8])]
    adapters += [{"kind": "value", "layer": 0, "energy_rank": 1}]
    assert analysis.kind_means(adapters) == {"query": 6.0, "value": 1.0}
    history = [{"step": s, "accuracy": a} for s, a in [(10, 0.2), (20, 0.5), (30, 0.7), (40, 0.72)]]
    assert analysis.last_quarter_change(history, "accuracy") == pytest.approx(0.72 - 0.7)  # 30 <= 0.75 * 40
    assert math.isnan(analysis.last_quarter_change(history[:1], "accuracy"))
    assert analysis.sign_verdict({"slope_lo": -2.0, "slope_hi": -0.5}, -1) == "reproduced"
    assert analysis.sign_verdict({"slope_lo": 0.5, "slope_hi": 2.0}, -1) == "contradicted"
    assert analysis.sign_verdict({"slope_lo": -1.0, "slope_hi": 2.0}, +1).startswith("inconclusive")
    interval = analysis.mean_interval([1.0, 2.0, 3.0])
    assert interval["slope"] == 2.0 and interval["slope_hi"] - 2.0 == pytest.approx(2.4841, abs=1e-3)


def test_seed_summary_calls_ties_only_outside_the_seed_spread() -> None:
    rows = [
        {"s": "a", "m": 0.80}, {"s": "a", "m": 0.84},  # mean 0.82, range 0.04
        {"s": "b", "m": 0.79}, {"s": "b", "m": 0.81},  # mean 0.80: within 0.04 -> tie
        {"s": "c", "m": 0.70}, {"s": "c", "m": 0.71},  # mean 0.705 -> worse
    ]  # fmt: skip
    verdicts = {s["group"]: s["verdict"] for s in analysis.seed_summary(rows, "s", "m", True)}
    assert verdicts == {"a": "best", "b": "tie with best", "c": "worse"}
    lower = {s["group"]: s["verdict"] for s in analysis.seed_summary(rows, "s", "m", False)}
    assert lower["c"] == "best" and lower["a"] == "worse"
    single = analysis.seed_summary(rows[::2], "s", "m", True)
    assert all("no call" in s["verdict"] for s in single)
    assert "tie" in analysis.compare(analysis.seed_summary(rows, "s", "m", True), "a", "b", True)


def test_default_workers_one_per_core_within_memory_and_one_on_a_gpu() -> None:
    gib = 2**30
    assert default_workers("cpu", cores=2, memory_bytes=24 * gib) == 2
    assert default_workers("cpu", cores=16, memory_bytes=6 * gib) == 4  # 1.5 GiB per worker
    assert default_workers("cpu", cores=4, memory_bytes=gib) == 1
    assert default_workers("cuda", cores=16, memory_bytes=64 * gib) == 1


def test_depth_profile_separates_falling_and_bell_shapes() -> None:
    layers = list(range(12))
    falling = analysis.depth_profile(layers, [20 - layer for layer in layers])
    assert falling["slope"] == pytest.approx(-1) and falling["middle_minus_ends"] == pytest.approx(0, abs=1e-12)
    assert falling["curvature"] == pytest.approx(0, abs=1e-9) and falling["peak"] == 0
    bell = analysis.depth_profile(layers, [10 - (layer - 5.5) ** 2 / 4 for layer in layers])
    # 4/4/4 thirds: middle layers 4..7 sit above layers 0..3 and 8..11
    assert bell["middle_minus_ends"] > 0 and bell["curvature"] == pytest.approx(-0.25)
    assert bell["slope"] == pytest.approx(0, abs=1e-9) and bell["peak"] in (5, 6)
    # repeated layers are averaged first; six layers split 2/2/2
    six = analysis.depth_profile([0, 0, 1, 2, 3, 4, 5], [1, 3, 2, 5, 5, 2, 2])
    assert six["middle_minus_ends"] == pytest.approx(5 - 2)
    assert math.isnan(analysis.depth_profile([3], [1.0])["slope"])
