"""Study 3, label noise: shuffle a fraction p of the training labels and follow the adapters' energy rank.

One class subset of ``num_classes`` classes per repeat, LoRA on ``lora.targets``, for every p of ``noise``. The study
found weaker but positive trends of energy rank with p.
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
from experiments.studies.common import classification_params
from experiments.studies.common import mean_rank_by_kind
from experiments.studies.common import run_classification

NAME = "label_noise"


def plan(config: dict[str, Any]) -> list[RunSpec]:
    """A LoRA run per (noise p, repeat); repeat i uses class subset i."""
    section = dict(config[NAME], subsets_per_count=config[NAME]["repeats"])
    return [
        RunSpec.make(
            NAME,
            f"noise{round(100 * p):02d}-n{section['num_classes']:02d}-s{rep}",
            classification_params(config, section, "lora", section["num_classes"], rep, float(p), config["seed"]),
        )
        for rep in range(section["repeats"])
        for p in section["noise"]
    ]


def execute(spec: RunSpec, ctx: RunContext) -> dict[str, Any]:
    """Train and analyse one run (see ``common.run_classification``)."""
    return run_classification(spec.params, ctx)


def report(rows: list[dict[str, Any]], config: dict[str, Any], outdir: Path) -> str:
    """Table ``energy_rank_vs_noise.md`` and plot ``energy_rank_vs_label_noise.png``."""
    plt = pyplot()
    outdir.mkdir(parents=True, exist_ok=True)
    if not rows:
        return f"### {NAME}\n\nno finished runs yet.\n"
    kinds = sorted({a["kind"] for r in rows for a in r["adapters"]})
    ps = sorted({r["params"]["noise"] for r in rows})
    by_p: dict[float, list[dict]] = defaultdict(list)
    for r in rows:
        by_p[r["params"]["noise"]].append(r)
    table = "## Per noise level p (means over repeats)\n\n"
    table += markdown_table(
        ["p", "runs", "wrong labels", "accuracy", *[f"energy rank {k}" for k in kinds]],
        [
            [p, len(by_p[p]), mean_ci([r["noisy_fraction"] for r in by_p[p]])[0],
             mean_ci([r["accuracy"] for r in by_p[p]])[0],
             *[mean_ci([mean_rank_by_kind(r)[k] for r in by_p[p]])[0] for k in kinds]]
            for p in ps
        ],
    )  # fmt: skip
    fits = {}
    for k in kinds:
        xs = [r["params"]["noise"] for r in rows for a in r["adapters"] if a["kind"] == k]
        ys = [a["energy_rank"] for r in rows for a in r["adapters"] if a["kind"] == k]
        fits[k] = fit_line(xs, ys)
    fits["accuracy"] = fit_line([r["params"]["noise"] for r in rows], [r["accuracy"] for r in rows])
    table += "\n## Trend with p (line: value = slope·p + intercept over all adapters / runs, 95% CI)\n\n"
    table += markdown_table(
        ["quantity", "slope [95% CI]", "intercept [95% CI]", "R²", "points"],
        [[k if k == "accuracy" else f"energy rank {k}", fmt_ci(f["slope"], f["slope_lo"], f["slope_hi"]),
          fmt_ci(f["intercept"], f["intercept_lo"], f["intercept_hi"]), f["r2"], f["n"]] for k, f in fits.items()],
    )  # fmt: skip
    atomic_write_text(outdir / "energy_rank_vs_noise.md", table)

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    for k in kinds:
        stats = [mean_ci([a["energy_rank"] for r in by_p[p] for a in r["adapters"] if a["kind"] == k]) for p in ps]
        ax.errorbar(ps, [m for m, _ in stats], yerr=[0 if math.isnan(h) else h for _, h in stats], marker="o",
                    capsize=3, label=k)  # fmt: skip
    ax.set(xlabel="label noise p", ylabel="energy rank (mean over layers)", title="Energy rank vs label noise")
    ax.legend(fontsize=8)
    ax2.plot(ps, [mean_ci([r["accuracy"] for r in by_p[p]])[0] for p in ps], "o-")
    ax2.set(xlabel="label noise p", ylabel="test accuracy (clean labels)", title="Accuracy vs label noise")
    save_figure(fig, outdir / "energy_rank_vs_label_noise.png")

    lines = [f"### {NAME}: {config[NAME]['num_classes']} classes, p in {ps}, {len(rows)} LoRA runs", ""]
    lines += [
        f"- energy rank of {k} vs p: slope {f['slope']:.2f} [{f['slope_lo']:.2f}, {f['slope_hi']:.2f}], "
        f"R² {f['r2']:.2f} (study: weaker, positive)"
        for k, f in fits.items()
        if k != "accuracy"
    ]
    lines.append(f"- accuracy vs p: slope {fits['accuracy']['slope']:.3f}, R² {fits['accuracy']['r2']:.2f}")
    return "\n".join(lines) + "\n"
