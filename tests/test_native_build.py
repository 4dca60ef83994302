"""How the package is built and checked: no torch at build time, the installed package under test, and benchmarks
that `pytest benchmarks --benchmark-only` collects."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import lora_fast

ROOT = Path(__file__).resolve().parent.parent


def test_build_does_not_need_torch():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requires = config["build-system"]["requires"]
    assert not [r for r in requires if r.split("[")[0].split("<")[0].split(">")[0].split("=")[0].strip() == "torch"]
    # no Python C API in the library: one py3-none wheel for every Python
    assert config["tool"]["scikit-build"]["wheel"]["py-api"] == "py3"


def test_tests_import_the_installed_package():
    """`python -m pytest` from the checkout must not test the source tree (it has no native library)."""
    package = Path(lora_fast.__file__).resolve().parent
    direct_url = json.loads(metadata.distribution("lora_fast").read_text("direct_url.json") or "{}")
    editable = direct_url.get("dir_info", {}).get("editable", False)
    assert editable or package != ROOT / "lora_fast", f"lora_fast imported from the checkout: {package}"


def test_benchmarks_are_collected():
    """README's `pytest benchmarks --benchmark-only` collects the benchmarks of both ops (and any added later)."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "benchmarks",
            "--benchmark-only",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "LORA_FAST_BENCH_DENSE_7B": ""},
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    files = {line.split("::")[0] for line in result.stdout.splitlines() if "::" in line}
    assert {"benchmarks/bench_lowrank_svd.py", "benchmarks/bench_lora_linear.py"} <= files, result.stdout[-3000:]
