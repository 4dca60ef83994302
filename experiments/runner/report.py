"""Markdown tables and figures of the studies' reports (statistics live in ``analysis``)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments.runner.store import atomic_write_bytes


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: floats to ``digits`` significant decimals, NaN as ``n/a``."""
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def fmt_ci(value: float, lo: float, hi: float, digits: int = 3) -> str:
    """``value [lo, hi]``."""
    return f"{fmt(value, digits)} [{fmt(lo, digits)}, {fmt(hi, digits)}]"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table.

    Args:
        headers: column titles.
        rows: cells (formatted with ``fmt``).
    """
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def save_figure(fig: Any, path: str | Path) -> Path:
    """Render a matplotlib figure to PNG atomically and close it.

    Args:
        fig: the figure.
        path: destination ``.png``.
    """
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (no display on a server)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
