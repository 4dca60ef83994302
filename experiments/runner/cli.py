"""Command line of ``experiments/run.py``: plan every study's runs, run what is not done yet, then report."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import traceback
from datetime import datetime
from datetime import timezone
from pathlib import Path
from typing import Any

from experiments.runner.config import load_config
from experiments.runner.config import read_config_file
from experiments.runner.context import RunContext
from experiments.runner.spec import RunSpec
from experiments.runner.store import ResultStore
from experiments.runner.store import atomic_write_json
from experiments.runner.store import atomic_write_text
from experiments.studies import STUDIES
from experiments.studies import get_study

RESULTS_ROOT = Path(__file__).resolve().parents[1] / "results"

DESCRIPTION = """\
Reproduce the LoRA intrinsic-rank studies offline.

With no arguments, runs the embedded default: a small-scale configuration sized for a 2-core CPU (about 15 minutes
for all registered studies; see the 'scale' field it writes), which produces every table and figure. Bigger
configurations come from --config (YAML or JSON, merged over the default; see experiments/configs/).

Studies (registered in experiments/studies/__init__.py):
{studies}

Results go to one folder per invocation (default experiments/results/<UTC time>-<config name>/):
  config.json              the resolved configuration
  runs/<run_id>.json       one finished run: params, seed, classes, metrics, per-adapter energy ranks, snapshots
  results.json, results.csv  all finished runs (CSV: scalar columns)
  <study>/*.md, *.png      regression tables and plots
  summary.md               what the console prints at the end
Files are written atomically (temporary file + rename). An interrupted sweep resumes with --resume <folder>: finished
runs are kept and never redone; runs that raised are retried.
"""


def _parser() -> argparse.ArgumentParser:
    studies = "\n".join(f"  {name:<18} {(get_study(name).__doc__ or '').splitlines()[0]}" for name in STUDIES)
    p = argparse.ArgumentParser(
        prog="python experiments/run.py",
        description=DESCRIPTION.format(studies=studies),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE", help="YAML/JSON configuration merged over the embedded default")
    p.add_argument("--out", metavar="DIR", help="results folder (must not hold runs already; use --resume for that)")
    p.add_argument("--resume", metavar="DIR", help="continue the sweep in DIR with the configuration stored there")
    p.add_argument("--studies", metavar="A,B", help="comma-separated subset of the configured studies to run")
    p.add_argument("--device", help="cpu, cuda or auto (overrides the configuration)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: one per core); on a machine shared with "
                   "other busy processes 1 thread runs several times faster than 2")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--dry-run", action="store_true", help="print the planned runs and exit")
    return p


def _resolve(args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    if args.resume:
        out = Path(args.resume)
        if not (out / "config.json").is_file():
            raise SystemExit(f"--resume {out}: no config.json there; not a results folder")
        if args.config:
            raise SystemExit("--resume uses the configuration stored in the folder; drop --config")
        config = read_config_file(out / "config.json")
    else:
        config = load_config(args.config)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        out = Path(args.out) if args.out else RESULTS_ROOT / f"{stamp}-{config['name']}"
        if (out / "runs").is_dir() and any((out / "runs").glob("*.json")):
            raise SystemExit(f"{out} already holds runs; continue it with --resume {out}")
    if args.studies:
        config["studies"] = [s.strip() for s in args.studies.split(",") if s.strip()]
    if args.device:
        config["device"] = args.device
    if args.threads:
        config["num_threads"] = args.threads
    if args.no_progress:
        config["progress"] = False
    for name in config["studies"]:
        if name not in STUDIES:
            raise SystemExit(f"unknown study {name!r}; registered: {', '.join(STUDIES)}")
    return config, out


def plan_all(config: dict[str, Any]) -> tuple[dict[str, list[RunSpec]], list[RunSpec]]:
    """Each study's specs, and the de-duplicated list of runs to execute (a run planned twice runs once).

    Args:
        config: resolved configuration.
    """
    per_study = {name: get_study(name).plan(config) for name in config["studies"]}
    unique: dict[str, RunSpec] = {}
    for specs in per_study.values():
        for spec in specs:
            if spec.run_id in unique and unique[spec.run_id].params != spec.params:
                raise RuntimeError(f"run id collision: {spec.run_id}")
            unique.setdefault(spec.run_id, spec)
    return per_study, list(unique.values())


def main(argv: list[str] | None = None) -> int:
    """Run the sweep; returns the exit status (1 when some run failed).

    Args:
        argv: arguments without the program name (default ``sys.argv[1:]``).
    """
    args = _parser().parse_args(argv)
    config, out = _resolve(args)
    # everything is read from installed packages; never wait on the network
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if config.get("num_threads"):
        torch.set_num_threads(int(config["num_threads"]))
    per_study, specs = plan_all(config)
    done = {s.run_id for s in specs if (out / "runs" / f"{s.run_id}.json").is_file()}
    pending = [s for s in specs if s.run_id not in done]
    print(f"[run] {config['name']}: {config.get('scale', '')}")
    print(f"[run] {len(specs)} runs planned for {', '.join(config['studies'])}; {len(specs) - len(pending)} done, "
          f"{len(pending)} to run; results in {out}")  # fmt: skip
    if args.dry_run:
        for s in specs:
            print(f"  {s.study:<18} {s.run_id}{'  (done)' if s.run_id in done else ''}")
        return 0

    store = ResultStore(out)
    store.lock()
    atomic_write_json(out / "config.json", config)

    try:
        return _sweep(config, out, store, per_study, specs, pending)
    finally:
        store.unlock()


def _sweep(
    config: dict[str, Any],
    out: Path,
    store: ResultStore,
    per_study: dict[str, list[RunSpec]],
    specs: list[RunSpec],
    pending: list[RunSpec],
) -> int:
    """Execute the pending runs, then report every study; returns the exit status."""
    import torch
    from tqdm.auto import tqdm

    ctx = RunContext(config, out)
    start, cpu_start = time.perf_counter(), time.process_time()
    failures = 0
    bar = tqdm(pending, desc="runs", disable=not ctx.progress, dynamic_ncols=True)
    try:
        for spec in bar:
            bar.set_postfix_str(spec.run_id)
            t0 = time.perf_counter()
            try:
                result = get_study(spec.study).execute(spec, ctx)
            except Exception as exc:
                failures += 1
                store.save_failure(spec.run_id, {"run_id": spec.run_id, "study": spec.study, "params": spec.params,
                                                 "error": repr(exc), "traceback": traceback.format_exc()})  # fmt: skip
                tqdm.write(f"[run] {spec.run_id} failed: {exc!r} (see runs/{spec.run_id}.failed.json)")
                continue
            row = {"run_id": spec.run_id, "study": spec.study, "params": spec.params, **result,
                   "seconds": time.perf_counter() - t0,
                   "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
            store.save_run(spec.run_id, row)
    except KeyboardInterrupt:
        bar.close()
        print(f"\n[run] interrupted; finished runs are saved. Continue with: python experiments/run.py --resume {out}")
        return 130
    bar.close()
    run_time, cpu_time = time.perf_counter() - start, time.process_time() - cpu_start

    rows = store.load_runs()
    summaries = []
    for name, study_specs in per_study.items():
        study_rows = [rows[s.run_id] for s in study_specs if s.run_id in rows]
        summaries.append(get_study(name).report(study_rows, config, out / name))
    store.write_tables([rows[s.run_id] for s in specs if s.run_id in rows])
    m = config["model"]
    header = [
        f"# Results: {config['name']}",
        "",
        f"Scale: {config.get('scale', 'as configured')}.",
        f"Model: {m['name']}, {m.get('num_layers') or 'all'} layers, max length {m['max_length']}. "
        f"Device: {config['device']}; torch threads {torch.get_num_threads()}; {platform.machine()}, "
        f"{os.cpu_count()} CPUs.",
        f"Runs: {len(rows)} finished of {len(specs)} planned ({failures} failed this time); this invocation trained "
        f"for {run_time:.0f} s ({cpu_time:.0f} s of CPU time over all threads).",
        "",
    ]
    summary = "\n".join(header) + "\n".join(summaries)
    atomic_write_text(out / "summary.md", summary)
    print("\n" + summary)
    print(f"[run] results: {out} (tables *.md and plots *.png in each study folder; results.csv; summary.md)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
