"""Study 2: energy rank by layer index for each matrix kind (query, key, value), for text and vision models.

It reuses the LoRA runs of the class-count sweep named by ``source`` (default ``rank_vs_classes``; the ViT variant
reads ``rank_vs_classes_vit``): same params, same run ids, so they train once. The unit is a run: each run's energy
ranks give one depth profile per matrix kind (``experiments.runner.analysis.depth_profile``: the slope over layer
index, the curvature of a quadratic fit, and the middle third of the layers minus the first and last thirds), and
every interval comes from the spread of those per-run values. The untrained adapter control of every layer is the
reference. The published study found energy rank falling with depth in BERT and bell-shaped over the layers of a
ViT; both shapes are tested for every model, and ``expected`` names the one published for this model.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from experiments.runner.analysis import depth_profile
from experiments.runner.analysis import mean_ci
from experiments.runner.analysis import mean_interval
from experiments.runner.analysis import sign_verdict
from experiments.runner.config import ConfigError
from experiments.runner.config import SweepConfig
from experiments.runner.context import RunContext
from experiments.runner.report import fmt_ci
from experiments.runner.report import markdown_table
from experiments.runner.report import pyplot
from experiments.runner.report import save_figure
from experiments.runner.spec import RunSpec
from experiments.runner.store import atomic_write_json
from experiments.runner.store import atomic_write_text
from experiments.studies._classification import run_classification
from experiments.studies._classification import sweep_specs

NAME = "layerwise"
# the published shapes: "falling" (energy rank falls with depth: BERT), "bell" (rises then falls: ViT)
SHAPES = ("falling", "bell")


@dataclasses.dataclass(frozen=True)
class Config:
    """Study 2's settings.

    Args:
        source: the class-count sweep whose LoRA runs are analysed by layer.
        expected: the published shape for this model family, ``falling`` (BERT) or ``bell`` (ViT).
    """

    source: str = "rank_vs_classes"
    expected: str = "falling"

    def __post_init__(self) -> None:
        if self.expected not in SHAPES:
            raise ConfigError(f"expected must be one of {', '.join(SHAPES)}, got {self.expected!r}")


@dataclasses.dataclass(frozen=True)
class VitConfig(Config):
    """Study 2 on the ViT: energy rank by layer over the 12 blocks of DINOv2 ViT-S/14 (study 1's ViT runs)."""

    source: str = "rank_vs_classes_vit"
    expected: str = "bell"


@dataclasses.dataclass(frozen=True)
class VitFashionConfig(Config):
    """Study 2 on the ViT with Fashion-MNIST (control corpus: is the ViT's layer profile a property of the data?)."""

    source: str = "rank_vs_classes_vit_fmnist"
    expected: str = "bell"


@dataclasses.dataclass(frozen=True)
class Vit112Config(Config):
    """Study 2 on the ViT with clip art at 112 px (control: is the ViT's layer profile an effect of 17 tokens?)."""

    source: str = "rank_vs_classes_vit_112"
    expected: str = "bell"


def plan(config: SweepConfig, name: str = NAME) -> list[RunSpec]:
    """The clean-label LoRA runs of the source sweep."""
    return sweep_specs(config, config.section(name).source, kinds=("lora",), shuffled=False)


def execute(spec: RunSpec, ctx: RunContext) -> dict[str, Any]:
    """Train and analyse one run (see ``_classification.run_classification``)."""
    return run_classification(spec.params, ctx)


def per_run_profiles(rows: list[dict[str, Any]], field: str = "energy_rank") -> dict[str, list[dict[str, float]]]:
    """Per matrix kind, each run's ``depth_profile`` of ``field`` over the layer index.

    Args:
        rows: LoRA runs.
        field: per-adapter value.
    """
    profiles: dict[str, list[dict[str, float]]] = defaultdict(list)
    for row in rows:
        by_kind: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for a in row["adapters"]:
            if a["layer"] is not None:
                by_kind[a["kind"]].append((a["layer"], float(a[field])))
        for kind, points in by_kind.items():
            profiles[kind].append(depth_profile([x for x, _ in points], [y for _, y in points]))
    return profiles


def shape_trends(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per matrix kind, the mean [95% CI] over runs of each depth-profile measure (``mean_interval`` mappings under
    ``slope``, ``curvature``, ``middle_minus_ends``), plus the mean peak layer.

    Args:
        rows: LoRA runs.
    """
    out = {}
    for kind, profiles in per_run_profiles(rows).items():
        out[kind] = {key: mean_interval([p[key] for p in profiles if math.isfinite(p[key])])
                     for key in ("slope", "curvature", "middle_minus_ends")}  # fmt: skip
        out[kind]["peak"] = {"mean": statistics.fmean(p["peak"] for p in profiles), "n": len(profiles)}
    return out


def shape_verdicts(trend: dict[str, dict[str, float]]) -> dict[str, str]:
    """``falling``: the per-run slope's interval against 0 (expected negative); ``bell``: the middle-minus-ends
    interval (expected positive) and, when it is reproduced, the curvature's (expected negative).

    Args:
        trend: one kind's entry of ``shape_trends``.
    """
    bell = sign_verdict(trend["middle_minus_ends"], +1)
    if bell == "reproduced" and sign_verdict(trend["curvature"], -1) != "reproduced":
        bell = "inconclusive (middle above the ends, but the curvature's CI spans 0)"
    return {"falling": sign_verdict(trend["slope"], -1), "bell": bell}


def report(rows: list[dict[str, Any]], config: SweepConfig, outdir: Path, name: str = NAME) -> str:
    """Tables ``energy_rank_by_layer.md``, ``layer_trend.json`` and plot ``energy_rank_vs_layer.png``."""
    outdir.mkdir(parents=True, exist_ok=True)
    section = config.section(name)
    ranks: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    controls: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        for a in row["adapters"]:
            if a["layer"] is not None:
                ranks[a["kind"]][a["layer"]].append(a["energy_rank"])
                if "control_energy_rank" in a:
                    controls[a["kind"]][a["layer"]].append(a["control_energy_rank"])
    if not ranks:
        return f"### {name}\n\nno finished LoRA runs yet.\n"
    kinds = sorted(ranks)
    layers = sorted({layer for k in kinds for layer in ranks[k]})
    model = rows[0]["params"]["model"]["name"]
    dataset = rows[0]["params"]["dataset"]

    def cell(values: list[float]) -> str:
        m, h = mean_ci(values)
        return fmt_ci(m, m - h, m + h, 2)

    def interval(t: dict[str, float], digits: int = 3) -> str:
        return fmt_ci(t["slope"], t["slope_lo"], t["slope_hi"], digits)

    table = (f"## Energy rank by layer ({model} on {dataset}; mean [95% CI] over {len(rows)} runs; untrained adapter "
             "control beside)\n\n")  # fmt: skip
    table += markdown_table(
        ["layer", *kinds, *[f"untrained {k}" for k in kinds]],
        [[layer, *[cell(ranks[k][layer]) for k in kinds],
          *[statistics.fmean(controls[k][layer]) if controls[k][layer] else "n/a" for k in kinds]] for layer in layers],
    )  # fmt: skip
    trends = shape_trends(rows)
    profiles = per_run_profiles(rows)
    verdicts = {k: shape_verdicts(t) for k, t in trends.items()}
    table += (
        "\n## Shape over depth (one profile per run; mean [95% CI] over runs)\n\n"
        "slope: least-squares change per layer; middle − ends: mean of the middle third of the layers minus the mean "
        "of the first and last thirds (0 for any straight line, > 0 for a bell); curvature: x² coefficient of a "
        f"quadratic fit (< 0 for a bell). Published for this model family: **{section.expected}** "
        "(BERT: falls with depth; ViT: bell-shaped).\n\n"
    )
    table += markdown_table(
        ["matrix", "slope per layer", "runs with slope < 0", "middle − ends", "curvature", "mean peak layer",
         "falls with depth?", "bell-shaped?"],
        [[k, interval(t["slope"]), f"{sum(p['slope'] < 0 for p in profiles[k])}/{t['slope']['n']}",
          interval(t["middle_minus_ends"], 2), interval(t["curvature"], 4), f"{t['peak']['mean']:.1f}",
          verdicts[k]["falling"], verdicts[k]["bell"]] for k, t in trends.items()],
    )  # fmt: skip
    atomic_write_text(outdir / "energy_rank_by_layer.md", table)
    atomic_write_json(outdir / "layer_trend.json", {
        "model": model, "dataset": dataset, "runs": len(rows), "layers": layers, "expected": section.expected,
        "mean_by_layer": {k: [statistics.fmean(ranks[k][x]) for x in layers] for k in kinds},
        "trends": trends, "verdicts": verdicts,
    })  # fmt: skip

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for k in kinds:
        stats = [mean_ci(ranks[k][x]) for x in layers]
        line = ax.errorbar(layers, [m for m, _ in stats], yerr=[0 if math.isnan(h) else h for _, h in stats],
                           marker="o", capsize=3, label=k)  # fmt: skip
        if any(controls[k][x] for x in layers):
            ax.plot(layers, [statistics.fmean(controls[k][x]) if controls[k][x] else math.nan for x in layers], ls="--",
                    color=line[0].get_color(), alpha=0.6, lw=1, label=f"{k} untrained")  # fmt: skip
    ax.set(xlabel="layer index", ylabel="energy rank (95% energy)", xticks=layers,
           title=f"Energy rank by layer, {model} (mean, 95% CI)")  # fmt: skip
    ax.legend(fontsize=7)
    save_figure(fig, outdir / "energy_rank_vs_layer.png")

    lines = [f"### {name}: {model} on {dataset}, {len(rows)} LoRA runs, layers {layers[0]}..{layers[-1]} "
             f"(published for this family: {section.expected})", ""]  # fmt: skip
    lines += [
        f"- {k}: slope {interval(t['slope'])}/layer ({verdicts[k]['falling']} as 'falls with depth'); middle − ends "
        f"{interval(t['middle_minus_ends'], 2)} ({verdicts[k]['bell']} as 'bell-shaped'); this design's CIs exclude 0 "
        f"only for |slope| > {(t['slope']['slope_hi'] - t['slope']['slope_lo']) / 2:.3f}, |middle − ends| > "
        f"{(t['middle_minus_ends']['slope_hi'] - t['middle_minus_ends']['slope_lo']) / 2:.2f}"
        for k, t in trends.items()
    ]
    return "\n".join(lines) + "\n"
