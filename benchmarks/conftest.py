"""Shared benchmark plumbing: a ratio table printed at the end of ``pytest benchmarks --benchmark-only``.

Each benchmark sets ``benchmark.group`` to a shape id and ``benchmark.extra_info`` with at least ``provider``,
``baseline`` (the provider its speedups are relative to) and ``ours`` (our provider in that group), and optionally
``floor`` (the provider that is the hardware floor), ``bytes`` (what the op must read, for a GB/s column),
``seconds`` (the time of the whole job, where the timed call covers only part of it and is extrapolated) and
``note``. The table shows, per group, every provider's median time, GB/s, its speedup over the baseline, how many
times slower it is than ours, and its multiple of the floor.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# `python -m pytest benchmarks` puts the checkout first on sys.path, where lora_fast has no native library: the
# benchmarks must time the installed package, so the checkout moves behind site-packages.
_here = [p for p in sys.path if Path(p or os.getcwd()).resolve() == ROOT]
for _p in _here:
    sys.path.remove(_p)
sys.path.extend(_here)

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # other work on the machine: spinning threads distort ratios


def machine_info() -> dict[str, str]:
    """Where a number was measured: CPU model and threads, GPU name, torch version, git sha."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        sha = ""
    return {
        "cpu": cpu,
        "threads": str(torch.get_num_threads()),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "torch": torch.__version__,
        "git_sha": sha,
    }


@pytest.fixture(scope="session")
def machine() -> dict[str, str]:
    return machine_info()


@pytest.fixture(scope="session")
def sync():
    """Waits for queued GPU work, so a timed call includes it (no-op on CPU)."""

    def wait(device: str) -> None:
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()

    return wait


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    benchmarks = [b for b in getattr(session, "benchmarks", []) if b.extra_info.get("provider")]
    if not benchmarks:
        return
    write = terminalreporter.write_line
    info = machine_info()
    write("")
    write(
        f"lora_fast ratio table — {info['cpu']}, {info['threads']} threads, GPU {info['gpu']}, "
        f"torch {info['torch']}, git {info['git_sha']}"
    )
    groups: dict[str, list] = {}
    for bench in benchmarks:
        groups.setdefault(bench.group or bench.name, []).append(bench)
    for group, members in groups.items():
        median = {b.extra_info["provider"]: b.extra_info.get("seconds", b.stats.median) for b in members}
        baseline = members[0].extra_info.get("baseline")
        ours = members[0].extra_info.get("ours")
        floor = members[0].extra_info.get("floor")  # a hardware floor, where the benchmark has one
        floor_head = f"{'x ' + str(floor):>16}" if floor in median else ""
        write("")
        write(f"[{group}]")
        write(
            f"  {'provider':<22}{'median':>12}{'GB/s':>8}{'speedup vs ' + str(baseline):>28}"
            f"{'x slower than ' + str(ours):>28}" + floor_head
        )
        for bench in sorted(members, key=lambda b: median[b.extra_info["provider"]]):
            provider = bench.extra_info["provider"]
            t = median[provider]
            vs_base = f"{median[baseline] / t:.2f}x" if baseline in median else "-"
            vs_ours = f"{t / median[ours]:.2f}x" if ours in median else "-"
            vs_floor = f"{t / median[floor]:>15.3f}x" if floor in median else ""
            rate = f"{bench.extra_info['bytes'] / t / 1e9:.1f}" if bench.extra_info.get("bytes") else "-"
            note = bench.extra_info.get("note", "")
            write(f"  {provider:<22}{t * 1e3:>10.3f}ms{rate:>8}{vs_base:>28}{vs_ours:>28}{vs_floor}  {note}")
