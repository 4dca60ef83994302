"""Regressions with confidence intervals, Markdown tables and figure saving shared by the studies' reports."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments.runner.store import atomic_write_bytes


def fit_line(x: Sequence[float], y: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """Least-squares line y = slope·x + intercept with R², p-value and ``confidence`` intervals (Student t).

    With fewer than 3 points, or no spread in x, the intervals and p-value are NaN.

    Args:
        x: predictor values.
        y: responses.
        confidence: interval level.
    """
    from scipy import stats

    n = len(x)
    nan = float("nan")
    out = {"n": n, "slope": nan, "intercept": nan, "r2": nan, "p": nan, "slope_lo": nan, "slope_hi": nan,
           "intercept_lo": nan, "intercept_hi": nan}  # fmt: skip
    if n < 2 or max(x) == min(x):
        return out
    fit = stats.linregress(x, y)
    out.update(slope=fit.slope, intercept=fit.intercept, r2=fit.rvalue**2 if math.isfinite(fit.rvalue) else nan)
    if n >= 3:
        t = stats.t.ppf(0.5 + confidence / 2, n - 2)
        out.update(
            p=fit.pvalue,
            slope_lo=fit.slope - t * fit.stderr,
            slope_hi=fit.slope + t * fit.stderr,
            intercept_lo=fit.intercept - t * fit.intercept_stderr,
            intercept_hi=fit.intercept + t * fit.intercept_stderr,
        )
    return out


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of its ``confidence`` interval (Student t; NaN half-width for one value).

    Args:
        values: samples.
        confidence: interval level.
    """
    from scipy import stats

    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)


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
