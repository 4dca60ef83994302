"""Study 2, layerwise trend: energy rank per layer index for each matrix kind (query, key, value).

It reuses the LoRA runs of the study named by ``source`` (default ``rank_vs_classes``): same params, same run ids,
so they train once. The study found energy rank falling with depth in BERT (bell-shaped in a ViT).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from experiments.runner.analysis import fit_line
from experiments.runner.analysis import fmt_ci
from experiments.runner.analysis import markdown_table
from experiments.runner.analysis import mean_ci
from experiments.runner.analysis import pyplot
from experiments.runner.analysis import save_figure
from experiments.runner.context import RunContext
from experiments.runner.spec import RunSpec
from experiments.runner.store import atomic_write_text
from experiments.studies import get_study

NAME = "layerwise"


def plan(config: dict[str, Any]) -> list[RunSpec]:
    """The LoRA runs of the source study."""
    return [s for s in get_study(config[NAME]["source"]).plan(config) if s.params["kind"] == "lora"]


def execute(spec: RunSpec, ctx: RunContext) -> dict[str, Any]:
    """Never called for the source study's own specs; kept for the study protocol."""
    return get_study(spec.study).execute(spec, ctx)


def report(rows: list[dict[str, Any]], config: dict[str, Any], outdir: Path) -> str:
    """Table ``energy_rank_by_layer.md`` and plot ``energy_rank_vs_layer.png``."""
    plt = pyplot()
    outdir.mkdir(parents=True, exist_ok=True)
    ranks: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        for a in row["adapters"]:
            if a["layer"] is not None:
                ranks[a["kind"]][a["layer"]].append(a["energy_rank"])
    if not ranks:
        return f"### {NAME}\n\nno finished LoRA runs yet.\n"
    kinds = sorted(ranks)
    layers = sorted({layer for k in kinds for layer in ranks[k]})
    table = f"## Energy rank by layer (mean [95% CI] over {len(rows)} runs)\n\n"
    table += markdown_table(
        ["layer", *kinds],
        [
            [layer, *[fmt_ci(m, m - h, m + h, 2) for m, h in (mean_ci(ranks[k][layer]) for k in kinds)]]
            for layer in layers
        ],
    )
    fits = {
        k: fit_line([x for x in layers for _ in ranks[k][x]], [y for x in layers for y in ranks[k][x]]) for k in kinds
    }
    table += "\n## Trend with depth (line: rank = slope·layer + intercept over all adapters, 95% CI)\n\n"
    table += markdown_table(
        ["matrix", "slope [95% CI]", "intercept [95% CI]", "R²", "points"],
        [[k, fmt_ci(f["slope"], f["slope_lo"], f["slope_hi"]), fmt_ci(f["intercept"], f["intercept_lo"],
                                                                       f["intercept_hi"]), f["r2"], f["n"]]
         for k, f in fits.items()],
    )  # fmt: skip
    atomic_write_text(outdir / "energy_rank_by_layer.md", table)

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for k in kinds:
        stats = [mean_ci(ranks[k][x]) for x in layers]
        ax.errorbar(layers, [m for m, _ in stats], yerr=[0 if math.isnan(h) else h for _, h in stats], marker="o",
                    capsize=3, label=k)  # fmt: skip
    ax.set(xlabel="layer index", ylabel="energy rank (95% energy)", title="Energy rank by layer", xticks=layers)
    ax.legend(fontsize=8)
    save_figure(fig, outdir / "energy_rank_vs_layer.png")

    def trend(f: dict[str, float]) -> str:
        if not math.isfinite(f["slope_lo"]):
            return "n/a"
        return "falling" if f["slope_hi"] < 0 else "rising" if f["slope_lo"] > 0 else "flat (CI spans 0)"

    lines = [f"### {NAME}: {len(rows)} LoRA runs, layers {layers[0]}..{layers[-1]}", ""]
    lines += [
        f"- {k}: slope {f['slope']:.3f}/layer [{f['slope_lo']:.3f}, {f['slope_hi']:.3f}], {trend(f)} "
        "(study, BERT: falling with depth)"
        for k, f in fits.items()
    ]
    return "\n".join(lines) + "\n"
