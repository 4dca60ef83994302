"""Study 2: energy rank by layer index for each matrix kind (query, key, value).

It reuses the LoRA runs of the class-count sweep named by ``source`` (default ``rank_vs_classes``): same params, same
run ids, so they train once. The unit is a run: each run's energy ranks are fitted against the layer index (one
slope per run and kind), and the slope's interval comes from the spread of those per-run slopes. The untrained
adapter control of every layer is the reference. The study found energy rank falling with depth in BERT
(bell-shaped in a ViT).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from experiments.runner.analysis import fit_line
from experiments.runner.analysis import mean_ci
from experiments.runner.analysis import mean_interval
from experiments.runner.analysis import sign_verdict
from experiments.runner.config import SweepConfig
from experiments.runner.context import RunContext
from experiments.runner.report import fmt_ci
from experiments.runner.report import markdown_table
from experiments.runner.report import pyplot
from experiments.runner.report import save_figure
from experiments.runner.spec import RunSpec
from experiments.runner.store import atomic_write_text
from experiments.studies._classification import run_classification
from experiments.studies._classification import sweep_specs

NAME = "layerwise"


@dataclasses.dataclass(frozen=True)
class Config:
    """Study 2's settings.

    Args:
        source: the class-count sweep whose LoRA runs are analysed by layer.
    """

    source: str = "rank_vs_classes"


def plan(config: SweepConfig) -> list[RunSpec]:
    """The clean-label LoRA runs of the source sweep."""
    return sweep_specs(config, config.section(NAME).source, kinds=("lora",), shuffled=False)


def execute(spec: RunSpec, ctx: RunContext) -> dict[str, Any]:
    """Train and analyse one run (see ``_classification.run_classification``)."""
    return run_classification(spec.params, ctx)


def per_run_slopes(rows: list[dict[str, Any]], field: str = "energy_rank") -> dict[str, list[float]]:
    """Per matrix kind, each run's least-squares slope of ``field`` against the layer index.

    Args:
        rows: LoRA runs.
        field: per-adapter value.
    """
    slopes: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        by_kind: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for a in row["adapters"]:
            if a["layer"] is not None:
                by_kind[a["kind"]].append((a["layer"], float(a[field])))
        for kind, points in by_kind.items():
            fit = fit_line([x for x, _ in points], [y for _, y in points])
            if math.isfinite(fit["slope"]):
                slopes[kind].append(fit["slope"])
    return slopes


def report(rows: list[dict[str, Any]], config: SweepConfig, outdir: Path) -> str:
    """Table ``energy_rank_by_layer.md`` and plot ``energy_rank_vs_layer.png``."""
    outdir.mkdir(parents=True, exist_ok=True)
    ranks: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    controls: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        for a in row["adapters"]:
            if a["layer"] is not None:
                ranks[a["kind"]][a["layer"]].append(a["energy_rank"])
                if "control_energy_rank" in a:
                    controls[a["kind"]][a["layer"]].append(a["control_energy_rank"])
    if not ranks:
        return f"### {NAME}\n\nno finished LoRA runs yet.\n"
    kinds = sorted(ranks)
    layers = sorted({layer for k in kinds for layer in ranks[k]})

    def cell(values: list[float]) -> str:
        m, h = mean_ci(values)
        return fmt_ci(m, m - h, m + h, 2)

    table = f"## Energy rank by layer (mean [95% CI] over {len(rows)} runs; untrained adapter control beside)\n\n"
    table += markdown_table(
        ["layer", *kinds, *[f"untrained {k}" for k in kinds]],
        [[layer, *[cell(ranks[k][layer]) for k in kinds],
          *[statistics.fmean(controls[k][layer]) if controls[k][layer] else "n/a" for k in kinds]] for layer in layers],
    )  # fmt: skip
    slopes = per_run_slopes(rows)
    trend = {k: mean_interval(slopes[k]) for k in kinds}
    table += "\n## Trend with depth (each run's slope of energy rank over layer index; mean [95% CI] over runs)\n\n"
    table += markdown_table(
        ["matrix", "slope per layer [95% CI]", "runs", "runs with a negative slope", "vs study (falls with depth)"],
        [[k, fmt_ci(t["slope"], t["slope_lo"], t["slope_hi"]), t["n"], sum(s < 0 for s in slopes[k]),
          sign_verdict(t, -1)] for k, t in trend.items()],
    )  # fmt: skip
    atomic_write_text(outdir / "energy_rank_by_layer.md", table)

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for k in kinds:
        stats = [mean_ci(ranks[k][x]) for x in layers]
        line = ax.errorbar(layers, [m for m, _ in stats], yerr=[0 if math.isnan(h) else h for _, h in stats],
                           marker="o", capsize=3, label=k)  # fmt: skip
        if any(controls[k][x] for x in layers):
            ax.plot(layers, [statistics.fmean(controls[k][x]) if controls[k][x] else math.nan for x in layers], ls="--",
                    color=line[0].get_color(), alpha=0.6, lw=1, label=f"{k} untrained")  # fmt: skip
    ax.set(xlabel="layer index", ylabel="energy rank (95% energy)", title="Energy rank by layer (mean, 95% CI)",
           xticks=layers)  # fmt: skip
    ax.legend(fontsize=7)
    save_figure(fig, outdir / "energy_rank_vs_layer.png")

    lines = [f"### {NAME}: {len(rows)} LoRA runs, layers {layers[0]}..{layers[-1]}", ""]
    lines += [
        f"- {k}: slope {fmt_ci(t['slope'], t['slope_lo'], t['slope_hi'])}/layer over {t['n']} runs "
        f"({sign_verdict(t, -1)}; study, BERT: falling with depth); this design's CI excludes 0 only for |slope| > "
        f"{(t['slope_hi'] - t['slope_lo']) / 2:.3f}"
        for k, t in trend.items()
    ]
    return "\n".join(lines) + "\n"
