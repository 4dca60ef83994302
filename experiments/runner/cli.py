"""Command line of ``experiments/run.py``: plan every study's runs, run what is not done yet, then report."""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import textwrap
import time
from concurrent.futures.process import BrokenProcessPool
from datetime import datetime
from datetime import timezone
from pathlib import Path
from typing import Any

from experiments.data import MissingDataError
from experiments.runner.config import ConfigError
from experiments.runner.config import SweepConfig
from experiments.runner.config import config_from_dict
from experiments.runner.config import config_to_dict
from experiments.runner.config import load_config
from experiments.runner.config import read_config_file
from experiments.runner.context import Runtime
from experiments.runner.pool import Outcome
from experiments.runner.pool import default_workers
from experiments.runner.pool import parse_shard
from experiments.runner.pool import run_specs
from experiments.runner.pool import shard_of
from experiments.runner.spec import RunSpec
from experiments.runner.store import CorruptFileError
from experiments.runner.store import ResultStore
from experiments.runner.store import atomic_write_json
from experiments.runner.store import atomic_write_text
from experiments.studies import STUDIES
from experiments.studies import get_study

RESULTS_ROOT = Path(__file__).resolve().parents[1] / "results"

DESCRIPTION = """\
Reproduce the LoRA intrinsic-rank studies offline.

With no arguments, runs the embedded default: studies 1-3 with their controls on a text model (MiniLM, WordNet) and a
small slice of the same studies on a ViT (DINOv2 ViT-S/14, clip art), sized to about 15 minutes on a 2-core CPU (see
the 'scale' line it prints). Bigger configurations come from --config (YAML or JSON, applied over the default; see
experiments/configs/, e.g. paper_cpu.yaml, paper_cpu_vision.yaml). Unknown or misspelt keys are errors.

Studies (registered in experiments/studies/__init__.py):
{studies}

Results go to one folder per sweep (default experiments/results/<UTC time>-<config name>/):
  config.json              the configuration (written once; --resume reads it and never rewrites it)
  runs/<run_id>.json       one finished run: params, seed, classes, metrics, per-adapter energy ranks, snapshots
  results.json, results.csv  every finished run of the configured studies (CSV: scalar columns)
  <study>/*.md, *.png      tables and plots
  summary.md               what the console prints at the end
Files are written atomically (temporary file + rename). An interrupted sweep resumes with --resume <folder>: finished
runs are kept and never redone; runs that raised, and result files found damaged, are run again.

Parallel and distributed: --workers N runs N worker processes, each loading the base model once; --shard i/N runs
every N-th run starting at the i-th (0 <= i < N), so N machines (e.g. a SLURM job array running
'run.py --config C --out DIR --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT') can share one results folder.
Each run is claimed with a file lock while it trains, so no run is trained twice; after the last shard, a plain
'--resume DIR' (it trains nothing new) writes the complete report.
"""


def _parser() -> argparse.ArgumentParser:
    studies = "\n".join(f"  {name:<26} {textwrap.shorten(get_study(name).summary, 96)}" for name in STUDIES)
    p = argparse.ArgumentParser(
        prog="python experiments/run.py",
        description=DESCRIPTION.format(studies=studies),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE", help="YAML/JSON configuration applied over the embedded default")
    p.add_argument("--out", metavar="DIR", help="results folder (must not hold runs already; use --resume for that)")
    p.add_argument("--resume", metavar="DIR", help="continue the sweep in DIR with the configuration stored there")
    p.add_argument("--studies", metavar="A,B", help="run only these of the configured studies (reports still cover "
                   "every configured study)")  # fmt: skip
    p.add_argument("--workers", type=int, metavar="N", help="worker processes (default: the configuration's, else "
                   "one per core on CPU, as memory allows, and 1 on a GPU)")  # fmt: skip
    p.add_argument("--threads", type=int, metavar="T", help="torch threads per worker (default: cores / workers)")
    p.add_argument("--shard", metavar="i/N", help="run only shard i of N (0-based) of the planned runs")
    p.add_argument("--device", help="cpu, cuda or auto (overrides the configuration for this invocation)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--dry-run", action="store_true", help="print the planned runs and exit")
    return p


def _new_config(args: argparse.Namespace) -> tuple[SweepConfig, Path]:
    config = load_config(args.config)
    if args.studies is not None:
        config = dataclasses.replace(config, studies=_study_list(args.studies, STUDIES, "registered"))
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else RESULTS_ROOT / f"{stamp}-{config.name}"
    stored = out / "config.json"
    if stored.is_file():
        same = read_config_file(stored) == _jsonable(config)
        if args.shard and same:
            return config, out  # another shard of the same sweep created the folder
        if not same:
            raise SystemExit(f"{out} holds a sweep with another configuration; continue it with --resume {out}, or "
                             "choose another --out")  # fmt: skip
    if (out / "runs").is_dir() and any((out / "runs").glob("*.json")) and not args.shard:
        raise SystemExit(f"{out} already holds runs; continue it with --resume {out}")
    return config, out


def _jsonable(config: SweepConfig) -> dict[str, Any]:
    import json

    return json.loads(json.dumps(config_to_dict(config)))


def _study_list(text: str, allowed: Any, what: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    if not names:
        raise SystemExit(f"--studies {text!r}: no study named")
    for name in names:
        if name not in allowed:
            raise SystemExit(f"--studies: unknown study {name!r}; {what}: {', '.join(allowed)}")
    return names


def _resolve(args: argparse.Namespace) -> tuple[SweepConfig, Path, tuple[str, ...]]:
    """(configuration, results folder, studies to run in this invocation)."""
    try:
        if args.resume:
            if args.config:
                raise SystemExit("--resume uses the configuration stored in the folder; drop --config")
            out = Path(args.resume)
            if not (out / "config.json").is_file():
                raise SystemExit(f"--resume {out}: no config.json there; not a results folder")
            config = config_from_dict(read_config_file(out / "config.json"), str(out / "config.json"))
            run_now = config.studies
            if args.studies is not None:
                run_now = _study_list(args.studies, config.studies, "this folder's studies")
            return config, out, run_now
        config, out = _new_config(args)
        return config, out, config.studies
    except ConfigError as exc:
        raise SystemExit(f"configuration error: {exc}") from None


def _runtime(args: argparse.Namespace, config: SweepConfig) -> Runtime:
    cores = os.cpu_count() or 1
    device = args.device or config.device
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise SystemExit(f"--device must be auto, cpu or cuda, got {device!r}")
    workers = args.workers if args.workers is not None else config.workers or default_workers(device)
    threads = args.threads if args.threads is not None else config.num_threads or max(1, cores // workers)
    if workers < 1 or threads < 1:
        raise SystemExit(f"--workers and --threads must be >= 1, got {workers} and {threads}")
    progress = config.progress and not args.no_progress
    # per-step bars of several workers would overwrite each other; the run bar of this process stays
    return Runtime(device=device, progress=progress and workers == 1, threads=threads, workers=workers)


def plan_all(config: SweepConfig) -> tuple[dict[str, list[RunSpec]], list[RunSpec]]:
    """Each configured study's specs, and the de-duplicated list of runs (a run planned twice runs once).

    Args:
        config: resolved configuration.
    """
    per_study = {name: get_study(name).plan(config) for name in config.studies}
    unique: dict[str, RunSpec] = {}
    for specs in per_study.values():
        for spec in specs:
            if spec.run_id in unique and unique[spec.run_id].params != spec.params:
                raise RuntimeError(f"run id collision: {spec.run_id}")
            unique.setdefault(spec.run_id, spec)
    return per_study, list(unique.values())


def main(argv: list[str] | None = None) -> int:
    """Run the sweep; returns the exit status (1 when some run failed, 130 when interrupted).

    Args:
        argv: arguments without the program name (default ``sys.argv[1:]``).
    """
    args = _parser().parse_args(argv)
    try:
        shard = parse_shard(args.shard) if args.shard else None
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    config, out, run_now = _resolve(args)
    runtime = _runtime(args, config)
    # everything is read from installed packages; never wait on the network
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        per_study, specs = plan_all(config)
    except (ConfigError, ValueError) as exc:
        raise SystemExit(f"configuration error: {exc}") from None
    except MissingDataError as exc:  # a study's corpus is read while planning (its class counts)
        raise SystemExit(f"missing data: {exc} (or leave its studies out with --studies)") from None
    wanted = {s.run_id for name in run_now for s in per_study[name]}
    todo = [s for s in specs if s.run_id in wanted]
    if shard is not None:
        todo = shard_of(todo, shard)
    store = ResultStore(out)
    damaged = store.damaged(s.run_id for s in todo)
    pending = [s for s in todo if not store.is_done(s.run_id)]
    where = f"shard {shard[0]}/{shard[1]} of " if shard else ""
    print(f"[run] {config.name}: {config.scale}")
    print(f"[run] {len(specs)} runs planned for {', '.join(config.studies)}; this invocation: {where}"
          f"{', '.join(run_now)}, {len(todo) - len(pending)} done, {len(pending)} to run with {runtime.workers} "
          f"worker(s) x {runtime.threads} thread(s); results in {out}")  # fmt: skip
    for path in damaged:
        print(f"[run] {path} is damaged (not valid JSON); that run will be trained again")
    if args.dry_run:
        for s in todo:
            print(f"  {s.study:<26} {s.run_id}{'' if s in pending else '  (done)'}")
        return 0
    if not (out / "config.json").is_file():
        atomic_write_json(out / "config.json", config_to_dict(config))
    show_bar = config.progress and not args.no_progress
    return _sweep(config, out, store, runtime, per_study, specs, pending, show_bar)


def _sweep(
    config: SweepConfig,
    out: Path,
    store: ResultStore,
    runtime: Runtime,
    per_study: dict[str, list[RunSpec]],
    specs: list[RunSpec],
    pending: list[RunSpec],
    show_bar: bool,
) -> int:
    """Execute the pending runs, then report every configured study; returns the exit status."""
    from tqdm.auto import tqdm

    start, cpu_start = time.perf_counter(), time.process_time()
    counts: dict[str, int] = {}
    bar = tqdm(total=len(pending), desc="runs", unit="run", disable=not (show_bar and pending),
               dynamic_ncols=True)  # fmt: skip

    def seen(outcome: Outcome) -> None:
        counts[outcome.status] = counts.get(outcome.status, 0) + 1
        bar.update(1)
        bar.set_postfix_str(f"{outcome.run_id} {outcome.status}")
        if outcome.status == "failed":
            tqdm.write(f"[run] {outcome.run_id} failed: {outcome.error} (see runs/{outcome.run_id}.failed.json)")

    try:
        run_specs(pending, config, out, runtime, seen)
    except KeyboardInterrupt:
        bar.close()
        print(f"\n[run] interrupted; finished runs are saved. Continue with: python experiments/run.py --resume {out}")
        return 130
    except BrokenProcessPool:
        bar.close()
        print(
            f"\n[run] a worker process died (killed by the system, e.g. out of memory?); finished runs are saved. "
            f"Continue with: python experiments/run.py --resume {out} (fewer --workers if memory is short)"
        )
        return 1
    bar.close()
    elapsed, cpu_time = time.perf_counter() - start, time.process_time() - cpu_start
    try:
        rows = store.load_runs(s.run_id for s in specs)
    except CorruptFileError as exc:
        raise SystemExit(f"[run] cannot report: {exc}; delete it and --resume {out} to train that run again") from None
    summaries = []
    for name, study_specs in per_study.items():
        study_rows = [rows[s.run_id] for s in study_specs if s.run_id in rows]
        summaries.append(get_study(name).report(study_rows, config, out / name))
    store.write_tables([rows[s.run_id] for s in specs if s.run_id in rows])
    finished = counts.get("finished", 0)
    others = ", ".join(f"{v} {k}" for k, v in counts.items() if k != "finished")
    header = [
        f"# Results: {config.name}",
        "",
        f"Scale: {config.scale}.",
        f"Device: {runtime.device}; {runtime.workers} worker(s) x {runtime.threads} torch thread(s); "
        f"{platform.machine()}, {os.cpu_count()} CPUs.",
        f"Runs: {len(rows)} finished of {len(specs)} planned. This invocation: {finished} trained"
        f"{f' ({others})' if others else ''} in {elapsed:.0f} s wall"
        f"{f', {3600 * finished / elapsed:.0f} runs/hour' if finished and elapsed > 0 else ''}.",
        "",
    ]
    if len(rows) < len(specs):
        header.insert(-1, f"Incomplete: {len(specs) - len(rows)} planned runs have no result yet; the tables cover "
                          f"the finished ones. `python experiments/run.py --resume {out}` completes them.")  # fmt: skip
    summary = "\n".join(header) + "\n".join(summaries)
    atomic_write_text(out / "summary.md", summary)
    print("\n" + summary)
    print(f"[run] results: {out} (tables *.md and plots *.png in each study folder; results.csv; summary.md); "
          f"this process used {cpu_time:.0f} s of CPU")  # fmt: skip
    return 1 if counts.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
