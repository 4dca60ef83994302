"""Executing runs: in this process (one worker) or in a pool of worker processes, and splitting a sweep in shards.

Each worker process builds one ``RunContext`` and keeps it for all its runs, so the base model, tokenizer and
dataset split are loaded once per worker. A run is executed under its claim (``ResultStore.claim``) and written
atomically by the process that trained it, so a pool, several ``--shard`` invocations sharing one folder, or a kill
at any moment never lose a finished run nor train one twice.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
import traceback
from collections.abc import Callable
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import as_completed
from dataclasses import dataclass
from datetime import datetime
from datetime import timezone
from pathlib import Path
from typing import Any

from experiments.runner.config import SweepConfig
from experiments.runner.context import RunContext
from experiments.runner.context import Runtime
from experiments.runner.spec import RunSpec
from experiments.runner.store import ResultStore


@dataclass(frozen=True)
class Outcome:
    """What happened to one planned run in this invocation.

    Args:
        run_id: the run.
        status: ``"finished"``, ``"failed"``, ``"already done"`` (another process finished it first) or ``"busy"``
            (another process holds its claim right now).
        seconds: wall time of the run (0 when not run here).
        error: ``repr`` of the exception of a failed run.
    """

    run_id: str
    status: str
    seconds: float = 0.0
    error: str = ""


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/N"`` (0 <= i < N) as ``(i, N)``.

    Args:
        text: e.g. ``"0/4"``; a SLURM job array passes ``$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``.
    """
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected i/N, e.g. 0/4") from None
    if not 0 <= index < count:
        raise ValueError(f"--shard {text!r}: need 0 <= i < N")
    return index, count


def shard_of(specs: Sequence[RunSpec], shard: tuple[int, int]) -> list[RunSpec]:
    """The runs of shard ``i`` of ``N``: every N-th run of the plan, starting at the i-th.

    The plan's order depends only on the configuration, so every invocation with the same configuration agrees on
    the split; round-robin (not hashing) keeps expensive and cheap runs spread evenly over the shards.

    Args:
        specs: the de-duplicated plan, in plan order.
        shard: ``(i, N)``.
    """
    index, count = shard
    return list(specs[index::count])


def execute_one(spec: RunSpec, ctx: RunContext, store: ResultStore) -> Outcome:
    """Claim, train and record one run (or say why not); failures are recorded in ``runs/<id>.failed.json``.

    Args:
        spec: the run.
        ctx: this process's caches and runtime settings.
        store: the results folder.
    """
    from experiments.studies import get_study

    claim = store.claim(spec.run_id)
    if claim is None:
        return Outcome(spec.run_id, "busy")
    try:
        if store.is_done(spec.run_id):
            return Outcome(spec.run_id, "already done")
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            result = get_study(spec.study).execute(spec, ctx)
        except Exception as exc:
            store.save_failure(spec.run_id, {"run_id": spec.run_id, "study": spec.study, "params": spec.params,
                                             "error": repr(exc), "traceback": traceback.format_exc()})  # fmt: skip
            return Outcome(spec.run_id, "failed", time.perf_counter() - start, repr(exc))
        seconds = time.perf_counter() - start
        # CPU seconds of this process over the whole run (set-up, training, evaluation, analysis): with one torch
        # thread per worker it is what the run costs on an idle core, however loaded the machine was
        cpu_seconds = time.process_time() - cpu_start
        finished = datetime.now(timezone.utc).isoformat(timespec="seconds")
        row = {"run_id": spec.run_id, "study": spec.study, "params": spec.params, **result, "seconds": seconds,
               "cpu_seconds": cpu_seconds, "device": ctx.device, "finished_at": finished}  # fmt: skip
        store.save_run(spec.run_id, row)
        return Outcome(spec.run_id, "finished", seconds)
    finally:
        claim.release()


# ----------------------------------------------------------------------------------------------- worker processes

_worker: dict[str, Any] = {}


def _raise_exit(signum: int, _frame: Any) -> None:
    # turns the pool's SIGTERM into an exception, so an atomic write in progress removes its temporary file
    raise SystemExit(128 + signum)


def _init_worker(config: SweepConfig, out: str, runtime: Runtime) -> None:
    import torch

    # Ctrl-C goes to the whole process group: the parent decides, workers are stopped by it (SIGTERM)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _raise_exit)
    torch.set_num_threads(runtime.threads)
    _worker["ctx"] = RunContext(config, out, runtime)
    _worker["store"] = ResultStore(out)


def _work(spec: RunSpec) -> Outcome:
    return execute_one(spec, _worker["ctx"], _worker["store"])


def run_specs(
    specs: Sequence[RunSpec],
    config: SweepConfig,
    out: Path,
    runtime: Runtime,
    on_outcome: Callable[[Outcome], None],
) -> None:
    """Execute ``specs`` with ``runtime.workers`` processes; ``on_outcome`` sees each result as it arrives.

    One worker runs in this process (no start-up cost, and tests can patch a study). More start as spawned
    processes (fresh interpreters: safe with torch's thread pools and with CUDA) that pull runs one at a time.
    KeyboardInterrupt stops the workers; a worker that dies raises ``BrokenProcessPool``; either way the finished
    runs are on disk already.

    Args:
        specs: runs to execute (already filtered to this invocation's share).
        config: the resolved configuration.
        out: the results folder.
        runtime: device, threads, workers, progress bars.
        on_outcome: called in this process once per run.
    """
    store = ResultStore(out)
    if runtime.workers == 1 or len(specs) <= 1:
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(runtime.threads)
        try:
            ctx = RunContext(config, out, runtime)
            for spec in specs:
                on_outcome(execute_one(spec, ctx, store))
        finally:
            torch.set_num_threads(before)  # this process may go on (a test session, a notebook)
        return
    executor = ProcessPoolExecutor(min(runtime.workers, len(specs)), multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(config, str(out), runtime))  # fmt: skip
    try:
        futures = [executor.submit(_work, spec) for spec in specs]
        for future in as_completed(futures):
            on_outcome(future.result())
    except BaseException:
        # Ctrl-C, or a worker killed (e.g. by the OOM killer: BrokenProcessPool): stop the others now; their runs
        # in flight are lost, every finished one is on disk
        for process in list((getattr(executor, "_processes", None) or {}).values()):
            process.terminate()
        executor.shutdown(wait=True, cancel_futures=True)
        raise
    executor.shutdown()


# resident memory of one worker training the 6-layer MiniLM was 0.9-1.1 GB (ps, 2-core machine); 1.5 GiB leaves room
WORKER_MEMORY_BYTES = int(1.5 * 2**30)


def default_workers(device: str, cores: int | None = None, memory_bytes: int | None = None) -> int:
    """Worker processes when neither ``--workers`` nor the configuration says.

    On CPU one single-threaded worker per core, as far as memory allows: measured on the 2-core CPU with
    ``experiments/measure_workers.py``, 2 workers x 1 thread completed more runs per hour than 1 worker x 2 threads
    (see README). On a GPU one worker: the runs share one device.

    Args:
        device: the invocation's device (``auto`` counts as CUDA when torch sees one).
        cores: CPU cores (default ``os.cpu_count()``).
        memory_bytes: physical memory (default from ``os.sysconf``).
    """
    if device.startswith("cuda") or (device == "auto" and _cuda_available()):
        return 1
    cores = cores or os.cpu_count() or 1
    if memory_bytes is None:
        memory_bytes = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return max(1, min(cores, memory_bytes // WORKER_MEMORY_BYTES))


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
