"""Statistics of the studies, in one place: lines and means with confidence intervals, per-run averages, the tie
rule of seed comparisons, and how far training had settled.

The unit of every interval here is an independent run (a class subset or a seed): per-layer values of one run are
averaged within the run first (``kind_means``), never treated as separate samples.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any


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


def ci_halfwidth(fit: Mapping[str, float]) -> float:
    """Half-width of a ``fit_line`` slope interval: at the observed residual spread, the smallest |slope| whose
    interval would exclude 0 (NaN when the fit has no interval).

    Args:
        fit: a ``fit_line`` result.
    """
    return (fit["slope_hi"] - fit["slope_lo"]) / 2


def kind_means(adapters: Iterable[Mapping[str, Any]], field: str = "energy_rank") -> dict[str, float]:
    """Mean of ``field`` over the layers of one run, per matrix kind (``{"query": 3.5, ...}``).

    Args:
        adapters: a run's adapter records (``kind`` and ``field`` keys).
        field: the per-adapter value to average.
    """
    by_kind: dict[str, list[float]] = {}
    for a in adapters:
        by_kind.setdefault(a["kind"], []).append(float(a[field]))
    return {k: statistics.fmean(v) for k, v in by_kind.items()}


def last_quarter_change(history: Sequence[Mapping[str, Any]], key: str) -> float:
    """``key`` at the last point minus ``key`` at the last point at or before 3/4 of the final step (NaN when
    there is none): how much a quantity still moved over the last quarter of training.

    Args:
        history: points ``{"step": int, key: value}`` in step order (e.g. ``TrainResult.eval_history``).
        key: the quantity.
    """
    points = [h for h in history if key in h]
    if len(points) < 2:
        return float("nan")
    end = points[-1]
    earlier = [h for h in points if h["step"] <= 0.75 * end["step"]]
    return float(end[key]) - float(earlier[-1][key]) if earlier else float("nan")


def seed_summary(rows: list[dict[str, Any]], key: str, metric: str, higher_better: bool) -> list[dict[str, Any]]:
    """Per group (``row[key]``): seeds, mean/min/max of ``metric`` and a verdict against the best group.

    A group ties with the best when |mean − best mean| ≤ max(its seed range, the best's seed range); with fewer
    than two seeds in either group no call is made.

    Args:
        rows: finished runs.
        key: field naming the group (e.g. ``strategy``).
        metric: field compared (e.g. ``accuracy``).
        higher_better: direction of ``metric``.
    """
    groups: dict[str, list[float]] = {}
    for r in rows:
        groups.setdefault(r[key], []).append(float(r[metric]))
    stats = []
    for group, values in groups.items():
        stats.append({"group": group, "seeds": len(values), "mean": statistics.fmean(values), "min": min(values),
                      "max": max(values), "range": max(values) - min(values)})  # fmt: skip
    best = (max if higher_better else min)(stats, key=lambda s: s["mean"])
    for s in stats:
        if s is best:
            s["verdict"] = "best" if s["seeds"] >= 2 else "best mean (1 seed: no call)"
        elif s["seeds"] < 2 or best["seeds"] < 2:
            s["verdict"] = "1 seed: no call"
        elif abs(s["mean"] - best["mean"]) <= max(s["range"], best["range"]):
            s["verdict"] = "tie with best"
        else:
            s["verdict"] = "worse"
    return stats


def compare(stats: list[dict[str, Any]], a: str, b: str, higher_better: bool) -> str:
    """One sentence comparing groups ``a`` and ``b`` of ``seed_summary`` with the same tie rule.

    Args:
        stats: ``seed_summary`` output.
        a: first group.
        b: second group.
        higher_better: direction of the metric.
    """
    by = {s["group"]: s for s in stats}
    if a not in by or b not in by:
        return f"{a} vs {b}: not both run."
    sa, sb = by[a], by[b]
    diff = sa["mean"] - sb["mean"]
    if min(sa["seeds"], sb["seeds"]) < 2:
        verdict = "no call with 1 seed"
    elif abs(diff) <= max(sa["range"], sb["range"]):
        verdict = "tie (difference within the seed-to-seed spread)"
    else:
        verdict = f"{a if (diff > 0) == higher_better else b} better"
    return f"{a} vs {b}: mean difference {diff:+.4f} (spreads {sa['range']:.4f} / {sb['range']:.4f}): {verdict}."


def sign_verdict(fit: Mapping[str, float], expected_sign: int) -> str:
    """Call a fitted slope against a published direction: ``reproduced`` when its interval lies on the expected
    side of 0, ``contradicted`` when it lies on the other side, else ``inconclusive (CI spans 0)``.

    Args:
        fit: a ``fit_line`` result (or any mapping with ``slope_lo``/``slope_hi``).
        expected_sign: +1 or -1.
    """
    lo, hi = fit["slope_lo"], fit["slope_hi"]
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "inconclusive (too few points for an interval)"
    if (lo > 0 and expected_sign > 0) or (hi < 0 and expected_sign < 0):
        return "reproduced"
    if lo > 0 or hi < 0:
        return "contradicted"
    return "inconclusive (CI spans 0)"


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """``mean_ci`` as a mapping shaped like a ``fit_line`` slope (``slope``, ``slope_lo``, ``slope_hi``, ``n``),
    for a quantity measured once per independent unit (e.g. each run's slope over layers).

    Args:
        values: one value per unit.
        confidence: interval level.
    """
    mean, half = mean_ci(list(values), confidence)
    return {"slope": mean, "slope_lo": mean - half, "slope_hi": mean + half, "n": len(values)}


def depth_profile(layers: Sequence[int], values: Sequence[float]) -> dict[str, float]:
    """Shape of one run's per-layer values over depth: ``slope`` (least squares per layer), ``curvature`` (the x²
    coefficient of a quadratic fit; < 0 for a ∩ shape), ``middle_minus_ends`` (mean of the middle third of the
    layers minus the mean of the first and last thirds: 0 for any straight line, > 0 for a bell) and ``peak`` (the
    layer with the largest value).

    Thirds split the sorted distinct layers into three runs of (nearly) equal length: 12 layers 4/4/4, 6 layers 2/2/2.

    Args:
        layers: layer index of each value.
        values: one value per layer (e.g. an energy rank), per-layer means when a layer appears several times.
    """
    import numpy as np

    nan = float("nan")
    by_layer: dict[int, list[float]] = {}
    for x, y in zip(layers, values, strict=True):
        by_layer.setdefault(int(x), []).append(float(y))
    xs = sorted(by_layer)
    ys = [statistics.fmean(by_layer[x]) for x in xs]
    out = {"slope": nan, "curvature": nan, "middle_minus_ends": nan, "peak": nan}
    if len(xs) >= 2:
        out["slope"] = float(np.polyfit(xs, ys, 1)[0])
        out["peak"] = float(xs[max(range(len(xs)), key=ys.__getitem__)])
    if len(xs) >= 3:
        out["curvature"] = float(np.polyfit(xs, ys, 2)[0])
        cut = [round(len(xs) * k / 3) for k in (1, 2)]
        ends = ys[: cut[0]] + ys[cut[1] :]
        out["middle_minus_ends"] = statistics.fmean(ys[cut[0] : cut[1]]) - statistics.fmean(ends)
    return out


def spearman_ci(
    x: Sequence[float], y: Sequence[float], confidence: float = 0.95, resamples: int = 4000, seed: int = 0
) -> dict[str, float]:
    """Spearman's rank correlation of paired values over independent units, with a bootstrap percentile interval
    (units resampled with replacement; resamples with no spread in x or y are skipped) and the two-sided p-value.

    Args:
        x: one value per unit (e.g. a task's predicted rank).
        y: one value per unit (e.g. the task's needed rank).
        confidence: interval level.
        resamples: bootstrap resamples (seeded: the interval is reproducible).
        seed: bootstrap seed.
    """
    import random

    from scipy import stats

    n = len(x)
    nan = float("nan")
    out = {"rho": nan, "lo": nan, "hi": nan, "p": nan, "n": n}
    if n < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return out
    fit = stats.spearmanr(x, y)
    out.update(rho=float(fit.statistic), p=float(fit.pvalue))
    rng = random.Random(seed)
    draws = []
    for _ in range(resamples):
        pick = [rng.randrange(n) for _ in range(n)]
        xs, ys = [x[i] for i in pick], [y[i] for i in pick]
        if len(set(xs)) > 1 and len(set(ys)) > 1:
            draws.append(float(stats.spearmanr(xs, ys).statistic))
    if len(draws) >= resamples // 2:
        draws.sort()
        tail = (1 - confidence) / 2
        out.update(lo=draws[int(tail * (len(draws) - 1))], hi=draws[int((1 - tail) * (len(draws) - 1))])
    return out


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """Mean of the paired differences a_i − b_i over independent units (e.g. seeds shared by two strategies), its
    Student-t interval and the standard deviation of the differences (``mean_interval``-shaped: ``slope``,
    ``slope_lo``, ``slope_hi``, ``n``, plus ``sd``).

    Args:
        a: one value per unit.
        b: the other condition's value for the same units.
        confidence: interval level.
    """
    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
    diffs = [u - v for u, v in zip(a, b, strict=True)]
    out = mean_interval(diffs, confidence)
    out["sd"] = statistics.stdev(diffs) if len(diffs) >= 2 else float("nan")
    return out


def detectable_difference(sd: float, n: int, confidence: float = 0.95, power: float = 0.8) -> float:
    """Smallest true mean difference a paired t-test over ``n`` units detects with probability ``power`` at the
    two-sided level 1 − ``confidence``, given the differences' standard deviation ``sd``: (t_{1−α/2} + t_{power})·sd/√n.

    Args:
        sd: standard deviation of the paired differences (measured).
        n: units (seeds).
        confidence: 1 − the test's level.
        power: detection probability.
    """
    from scipy import stats

    if n < 2 or not math.isfinite(sd):
        return float("nan")
    df = n - 1
    return (stats.t.ppf(0.5 + confidence / 2, df) + stats.t.ppf(power, df)) * sd / math.sqrt(n)


def units_needed(sd: float, difference: float, confidence: float = 0.95, power: float = 0.8, cap: int = 10_000) -> int:
    """Smallest number of units (seeds) whose paired t-test detects ``difference`` (``detectable_difference`` ≤ it).

    Args:
        sd: standard deviation of the paired differences (measured).
        difference: the difference to detect (> 0).
        confidence: 1 − the test's level.
        power: detection probability.
        cap: give up beyond this many (returned as is).
    """
    if difference <= 0 or not math.isfinite(sd):
        raise ValueError(f"need a positive difference and a finite sd, got {difference} and {sd}")
    n = 2
    while n < cap and detectable_difference(sd, n, confidence, power) > difference:
        n += 1
    return n


def difference_verdict(difference: Mapping[str, float], margin: float) -> str:
    """Call a paired difference (``paired_difference``) of a metric where higher is better: ``better`` or ``worse``
    when its interval excludes 0, ``equivalent (within ±margin)`` when the interval lies inside (−margin, margin),
    else ``inconclusive``.

    Args:
        difference: a ``paired_difference`` result (``slope_lo``/``slope_hi``).
        margin: the difference that matters (e.g. 0.02 for two accuracy points).
    """
    lo, hi = difference["slope_lo"], difference["slope_hi"]
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "inconclusive (too few units for an interval)"
    if lo > 0:
        return "better"
    if hi < 0:
        return "worse"
    if -margin < lo and hi < margin:
        return f"equivalent (within ±{margin:g})"
    return "inconclusive"
