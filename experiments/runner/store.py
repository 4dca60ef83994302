"""The results folder of one invocation: one JSON file per finished run, written atomically.

Layout::

    <out>/config.json            the resolved configuration (``--resume`` reads it back)
    <out>/runs/<run_id>.json     one finished run; its presence is what "done" means
    <out>/runs/<run_id>.failed.json   a run that raised (retried by --resume)
    <out>/results.json, results.csv   every finished run, rewritten at the end
    <out>/<study>/...            each study's tables (Markdown) and plots (PNG)
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then ``os.replace`` it into place.

    A reader (or a resumed sweep after a kill) sees either the old file or the complete new one, never a part.

    Args:
        path: destination.
        data: the contents.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """``atomic_write_bytes`` for UTF-8 text.

    Args:
        path: destination.
        text: the contents.
    """
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """``atomic_write_bytes`` for JSON (indented, keys in insertion order).

    Args:
        path: destination.
        obj: a JSON-able object.
    """
    atomic_write_text(path, json.dumps(obj, indent=1, allow_nan=True) + "\n")


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, (list, tuple)):
        if all(isinstance(v, (str, int, float, bool)) or v is None for v in value) and len(value) <= 64:
            out[prefix] = ";".join(str(v) for v in value)
    else:
        out[prefix] = value


def flat_row(row: dict[str, Any], skip: Iterable[str] = ("adapters", "snapshots", "train_loss")) -> dict[str, Any]:
    """Scalars of a nested row as ``a.b.c`` columns; short lists joined with ``;``; bulky fields skipped.

    Args:
        row: a run's result.
        skip: top-level keys left out (kept in the JSON only).
    """
    out: dict[str, Any] = {}
    _flatten("", {k: v for k, v in row.items() if k not in skip}, out)
    return out


class ResultStore:
    """One invocation's results folder; see the module docstring for the layout.

    Args:
        root: the folder (created if needed).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.runs_dir = self.root / "runs"
        self.runs_dir.mkdir(parents=True, exist_ok=True)

    def lock(self) -> None:
        """Take an exclusive lock on the folder for the life of the process (the OS drops it on exit or kill).

        Two sweeps writing the same folder would train the same runs twice; the second one stops here instead.
        """
        import fcntl

        # held open until unlock() or the end of the process
        self._lock_file = open(self.root / ".lock", "w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise SystemExit(f"{self.root} is in use by another run.py; wait for it or stop it first") from None

    def unlock(self) -> None:
        """Release ``lock``."""
        self._lock_file.close()

    def run_path(self, run_id: str) -> Path:
        return self.runs_dir / f"{run_id}.json"

    def is_done(self, run_id: str) -> bool:
        return self.run_path(run_id).is_file()

    def save_run(self, run_id: str, row: dict[str, Any]) -> None:
        """Record a finished run (atomically) and clear an earlier failure record of it."""
        atomic_write_json(self.run_path(run_id), row)
        (self.runs_dir / f"{run_id}.failed.json").unlink(missing_ok=True)

    def save_failure(self, run_id: str, info: dict[str, Any]) -> None:
        atomic_write_json(self.runs_dir / f"{run_id}.failed.json", info)

    def load_runs(self) -> dict[str, dict[str, Any]]:
        """Every finished run by id (temporary files of an interrupted write are ignored)."""
        rows = {}
        for path in sorted(self.runs_dir.glob("*.json")):
            if not path.name.endswith(".failed.json"):
                rows[path.stem] = json.loads(path.read_text(encoding="utf-8"))
        return rows

    def write_tables(self, rows: list[dict[str, Any]]) -> None:
        """``results.json`` (full rows) and ``results.csv`` (flattened scalars, union of columns)."""
        atomic_write_json(self.root / "results.json", rows)
        flat = [flat_row(r) for r in rows]
        columns: list[str] = []
        for f in flat:
            columns += [c for c in f if c not in columns]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(flat)
        atomic_write_text(self.root / "results.csv", buf.getvalue())
