"""Runs per hour of the default's run mix with N single-threaded workers vs fewer processes with more threads.

    python experiments/measure_workers.py                  # 2 x 1 thread vs 1 x 2 threads, 3 interleaved rounds
    python experiments/measure_workers.py --layouts 2x1,1x2,4x1 --rounds 2

Each trial is a fresh ``run.py`` process sweeping the same small slice of the default (``--slice``: study-1 runs of
two class counts, their full fine-tuning and LoRA runs at the default's step counts, scaled down by
``--steps``) into a temporary folder. Layouts alternate within each round (A B, B A, ...), so a change in background
load hits both; the median over rounds is reported, with the load average seen during each trial. Two figures per
trial: wall-clock runs per hour (start-up included: imports, spawning workers, loading the model once per worker)
and the steady-state rate from the runs' own durations (workers × 3600 / mean run seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def trial_config(steps: int) -> dict:
    """A slice of the default: study 1 at n = 4 and 16, 2 subsets each, full + LoRA, ``steps`` steps per run."""
    train = {"max_steps": steps, "eval_every": max(1, steps // 4)}
    return {
        "name": "measure-workers",
        "scale": "worker-layout measurement (a slice of the default)",
        "progress": False,
        "studies": ["rank_vs_classes"],
        "rank_vs_classes": {"class_counts": [4, 16], "subsets_per_count": 2, "shuffled_control_subsets": 0,
                            "lora": {**train, "snapshot_every": max(1, steps // 8)}, "full": train},
    }  # fmt: skip


def run_trial(config: Path, workers: int, threads: int) -> dict[str, float]:
    """One ``run.py`` sweep into a fresh folder; runs/hour by wall clock and by the runs' own durations."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        cmd = [sys.executable, str(ROOT / "experiments" / "run.py"), "--config", str(config), "--out", str(out),
               "--workers", str(workers), "--threads", str(threads), "--no-progress"]  # fmt: skip
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        rows = json.loads((out / "results.json").read_text())
    seconds = [r["seconds"] for r in rows]
    return {
        "runs": len(rows),
        "wall_s": wall,
        "runs_per_hour": 3600 * len(rows) / wall,
        "steady_runs_per_hour": workers * 3600 / statistics.fmean(seconds),
        "mean_run_s": statistics.fmean(seconds),
        "mean_run_cpu_s": statistics.fmean(r["cpu_seconds"] for r in rows),
        "load": (load_before + os.getloadavg()[0]) / 2,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", default="2x1,1x2", help="WORKERSxTHREADS, comma-separated (default 2x1,1x2)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--steps", type=int, default=48, help="training steps per run (default 48)")
    args = p.parse_args()
    layouts = [tuple(int(v) for v in item.split("x")) for item in args.layouts.split(",")]
    results: dict[str, list[dict[str, float]]] = {f"{w}x{t}": [] for w, t in layouts}
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "measure.json"
        config.write_text(json.dumps(trial_config(args.steps)))
        for round_index in range(args.rounds):
            order = layouts if round_index % 2 == 0 else layouts[::-1]
            for workers, threads in order:
                trial = run_trial(config, workers, threads)
                results[f"{workers}x{threads}"].append(trial)
                print(f"round {round_index + 1} {workers} worker(s) x {threads} thread(s): {trial['runs']} runs in "
                      f"{trial['wall_s']:.0f} s, {trial['runs_per_hour']:.0f} runs/h wall, "
                      f"{trial['steady_runs_per_hour']:.0f} runs/h steady, mean run {trial['mean_run_s']:.1f} s "
                      f"({trial['mean_run_cpu_s']:.1f} s CPU), load {trial['load']:.2f}", flush=True)  # fmt: skip
    print(f"\nmedians over {args.rounds} rounds ({os.cpu_count()} CPUs):")
    print("| layout | runs/h (wall, start-up included) | runs/h (steady) | mean run s | load avg |")
    print("|---|---|---|---|---|")
    for name, trials in results.items():
        med = {k: statistics.median(t[k] for t in trials) for k in trials[0]}
        print(f"| {name} | {med['runs_per_hour']:.0f} | {med['steady_runs_per_hour']:.0f} | {med['mean_run_s']:.1f} | "
              f"{med['load']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
