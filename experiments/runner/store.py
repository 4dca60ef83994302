"""The results folder of a sweep: one JSON file per finished run, written atomically; the files are the truth.

Layout::

    <out>/config.json                 the configuration, written once when the folder is created (--resume reads it)
    <out>/runs/<run_id>.json          one finished run; its presence (valid JSON) is what "done" means
    <out>/runs/<run_id>.failed.json   a run that raised (retried by --resume)
    <out>/runs/.<run_id>.claim        exists while a process runs that run (flock held; removed after)
    <out>/results.json, results.csv   every finished run of the configured studies, rewritten at each report
    <out>/<study>/...                 each study's tables (Markdown) and plots (PNG)

Any number of processes (worker pools, ``--shard`` invocations on other machines sharing the folder) may work on one
folder at once: a run is executed only by the process holding its claim (an exclusive ``flock``), and only when no
valid result file exists, so no run is trained twice. Files are created readable as the umask allows (0644 under
the usual 022), like any other output.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import io
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def _file_mode() -> int:
    # mkstemp creates 0600; results are ordinary outputs, so apply the process umask as open() would
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


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
            os.fchmod(fh.fileno(), _file_mode())
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


class CorruptFileError(ValueError):
    """A results file is not valid JSON; the message names it."""


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; an invalid or empty file raises ``CorruptFileError`` naming it.

    Args:
        path: the file.
    """
    text = Path(path).read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        what = "empty" if not text.strip() else f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        raise CorruptFileError(f"{path}: {what}") from None


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, (list, tuple)):
        if all(isinstance(v, (str, int, float, bool)) or v is None for v in value) and len(value) <= 64:
            out[prefix] = ";".join(str(v) for v in value)
    else:
        out[prefix] = value


def flat_row(
    row: dict[str, Any], skip: Iterable[str] = ("adapters", "snapshots", "train_loss", "eval_history")
) -> dict[str, Any]:
    """Scalars of a nested row as ``a.b.c`` columns; short lists joined with ``;``; bulky fields skipped.

    Args:
        row: a run's result.
        skip: top-level keys left out (kept in the JSON only).
    """
    out: dict[str, Any] = {}
    _flatten("", {k: v for k, v in row.items() if k not in skip}, out)
    return out


class Claim:
    """An exclusive hold on one run (``ResultStore.claim``); ``release`` removes the claim file."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    def release(self) -> None:
        """Remove the claim file, then drop the lock (in this order, so no one locks a file about to vanish)."""
        self.path.unlink(missing_ok=True)
        os.close(self._fd)


class ResultStore:
    """A sweep's results folder; see the module docstring for the layout.

    Args:
        root: the folder (created if needed).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.runs_dir = self.root / "runs"
        self.runs_dir.mkdir(parents=True, exist_ok=True)

    def run_path(self, run_id: str) -> Path:
        """Where the finished run ``run_id`` is stored."""
        return self.runs_dir / f"{run_id}.json"

    def is_done(self, run_id: str) -> bool:
        """True when ``run_id`` has a result file that parses (an empty or damaged file means: run it again)."""
        path = self.run_path(run_id)
        if not path.is_file():
            return False
        try:
            read_json(path)
        except CorruptFileError:
            return False
        return True

    def damaged(self, run_ids: Iterable[str]) -> list[Path]:
        """Result files among ``run_ids`` that exist but do not parse (they are run again)."""
        return [self.run_path(r) for r in run_ids if self.run_path(r).is_file() and not self.is_done(r)]

    def claim(self, run_id: str) -> Claim | None:
        """An exclusive claim on ``run_id``, or None when another process holds it.

        Args:
            run_id: the run.
        """
        path = self.runs_dir / f".{run_id}.claim"
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, _file_mode())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    return None
                raise
            # the holder before us may have removed the file between our open and our lock: retry on the new one
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    return Claim(path, fd)
            except FileNotFoundError:
                pass
            os.close(fd)

    def save_run(self, run_id: str, row: dict[str, Any]) -> None:
        """Record a finished run (atomically) and clear an earlier failure record of it."""
        atomic_write_json(self.run_path(run_id), row)
        (self.runs_dir / f"{run_id}.failed.json").unlink(missing_ok=True)

    def save_failure(self, run_id: str, info: dict[str, Any]) -> None:
        """Record a run that raised (kept until a retry succeeds)."""
        atomic_write_json(self.runs_dir / f"{run_id}.failed.json", info)

    def load_runs(self, run_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The finished runs among ``run_ids`` by id; a damaged file raises ``CorruptFileError`` naming it.

        Args:
            run_ids: the runs wanted (those without a file are left out).
        """
        rows = {}
        for run_id in run_ids:
            path = self.run_path(run_id)
            if path.is_file():
                rows[run_id] = read_json(path)
        return rows

    def stored_ids(self) -> set[str]:
        """Ids of every result file in ``runs/`` (planned or not)."""
        return {p.stem for p in self.runs_dir.glob("*.json") if not p.name.endswith(".failed.json")}

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
