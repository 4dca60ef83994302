"""Rank needed vs rank measured: does the energy rank after a short probe predict the rank a task needs?

Tasks of increasing complexity: n random classes of a corpus, for a text family (MiniLM on WordNet glosses) and a
vision family (DINOv2 ViT-S/14, tuned for saliency, on clip art), several class subsets per n. For every task:

- **Needed rank**: LoRA at every rank of ``ranks`` (query/key/value, rank-stabilised scaling alpha/sqrt(r), so the
  update scale and the learning rate do not change with r), ``seeds`` training seeds each on the same data; the
  needed rank is the smallest r whose mean accuracy is within one seed spread of the largest rank's (r = 64):
  acc(r) >= acc(64) - s, with s the standard deviation over seeds pooled over the task's ranks.
- **Measured rank**: ``lora_fast.allocation.suggest_ranks`` on the task's training data, as a user would call it: a
  probe of ``probe_steps`` steps at ``probe_rank``, then every adapter's energy rank. The prediction is the median
  energy rank over adapters (continuous), and the suggested uniform rank (rounded up to a power of two).

Statistics: the unit is a task. Spearman's rho between prediction and needed rank over tasks, with a bootstrap
interval; the same for the baseline predictor n - 1 (the rank of the classifier head's gradient), which says whether
the energy rank tells more than the number of classes. Calibration: the geometric mean of needed / predicted with a
t interval (the ``scale`` of ``suggest_ranks`` that would centre the prediction), the share of tasks whose suggested
rank was enough, and the accuracy the suggestion gives up against r = 64.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from experiments.runner.analysis import mean_ci
from experiments.runner.analysis import spearman_ci
from experiments.runner.config import LORA_KEYS
from experiments.runner.config import ConfigError
from experiments.runner.config import LoraSettings
from experiments.runner.config import ModelSettings
from experiments.runner.config import SweepConfig
from experiments.runner.context import RunContext
from experiments.runner.report import fmt_ci
from experiments.runner.report import markdown_table
from experiments.runner.report import pyplot
from experiments.runner.report import save_figure
from experiments.runner.spec import RunSpec
from experiments.runner.store import atomic_write_json
from experiments.runner.store import atomic_write_text
from experiments.studies._classification import ClassCountSweep
from experiments.studies._classification import clipart_options
from experiments.studies._classification import run_classification
from experiments.studies._classification import run_params
from experiments.studies._classification import subsets_for
from experiments.studies._classification import task_data
from experiments.studies._classification import vit_model

NAME = "rank_prediction"
FAMILIES = ("text", "vit")
# rank-stabilised alpha: alpha / sqrt(r) = 2 at r = 32, the update scale of the text default (r = 32, alpha 64)
RS_ALPHA = 2 * math.sqrt(32)


def _text_task() -> ClassCountSweep:
    return ClassCountSweep(
        dataset="wordnet", train_size=256, eval_size=400, class_counts=(2, 4, 8, 16, 32), subsets_per_count=2,
        model=ModelSettings("minilm", 6, 32),
        lora=LoraSettings(targets=["query", "key", "value"], r=64, alpha=RS_ALPHA, use_rslora=True, lr=4e-3,
                          max_steps=96, batch_size=16),
    )  # fmt: skip


def _vit_task() -> ClassCountSweep:
    # 64 steps: the ViT's accuracy on 60 clip-art images levels off by ~40 steps (measured, study 1's pilot)
    return ClassCountSweep(
        dataset="clipart", dataset_options=clipart_options(), test_fraction=0.25, min_per_class=40, train_size=60,
        eval_size=160, class_counts=(2, 4, 8, 16), subsets_per_count=2, model=vit_model(),
        lora=LoraSettings(targets=["query", "key", "value"], r=64, alpha=RS_ALPHA, use_rslora=True, lr=2e-3,
                          max_steps=64, batch_size=16),
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the rank-prediction study.

    Args:
        families: which task families run (``text``, ``vit``).
        text: the text tasks (a class-count sweep; its ``lora.r`` is replaced by each of ``ranks``).
        vit: the vision tasks.
        ranks: uniform LoRA ranks trained on every task; the largest is the reference.
        seeds: training seeds per (task, rank); the data of a task is fixed by the global seed.
        probe_rank: rank of the probe of ``suggest_ranks``.
        probe_steps: optimizer steps of the probe.
        threshold: energy share of the energy rank.
        quantile: quantile of the adapters' energy ranks that gives the suggested uniform rank (0.5: median).
    """

    families: tuple[str, ...] = FAMILIES
    text: ClassCountSweep = dataclasses.field(default_factory=_text_task)
    vit: ClassCountSweep = dataclasses.field(default_factory=_vit_task)
    ranks: tuple[int, ...] = (1, 2, 4, 8, 16, 64)
    seeds: tuple[int, ...] = (0, 1, 2)
    probe_rank: int = 64
    probe_steps: int = 24
    threshold: float = 0.95
    quantile: float = 0.5

    def __post_init__(self) -> None:
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown or not self.families:
            raise ConfigError(f"families: need some of {', '.join(FAMILIES)}, got {list(self.families)}")
        if len(self.ranks) < 2 or any(r < 1 for r in self.ranks) or list(self.ranks) != sorted(set(self.ranks)):
            raise ConfigError(f"ranks: need at least two increasing ranks >= 1, got {list(self.ranks)}")
        if len(self.seeds) < 2 or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: need at least two distinct seeds (the seed spread defines 'needed'), got "
                              f"{list(self.seeds)}")  # fmt: skip
        if self.probe_rank < 1 or self.probe_steps < 1 or not 0 < self.threshold <= 1 or not 0 <= self.quantile <= 1:
            raise ConfigError(f"need probe_rank, probe_steps >= 1, threshold in (0, 1], quantile in [0, 1]; got "
                              f"{self.probe_rank}, {self.probe_steps}, {self.threshold}, {self.quantile}")  # fmt: skip


def plan(config: SweepConfig, name: str = NAME) -> list[RunSpec]:
    """Per task: one probe, and a LoRA run per (rank, seed)."""
    sec = config.section(name)
    specs = []
    for family in sec.families:
        task: ClassCountSweep = getattr(sec, family)
        for n in task.class_counts:
            subsets = subsets_for(task, n, f"{name}.{family}")
            for subset in range(subsets):
                base = {**run_params(task, "lora", n, subset, subsets, 0.0, config.seed), "family": family}
                tag = f"{family}-n{n:02d}-s{subset}"
                probe = {"rank": sec.probe_rank, "steps": sec.probe_steps, "threshold": sec.threshold,
                         "quantile": sec.quantile}  # fmt: skip
                specs.append(RunSpec.make(name, f"probe-{tag}", {**base, "kind": "probe", "probe": probe,
                                                                 "train_seed": sec.seeds[0]}))  # fmt: skip
                for r in sec.ranks:
                    for seed in sec.seeds:
                        params = {**base, "train": {**base["train"], "r": r}, "train_seed": seed}
                        specs.append(RunSpec.make(name, f"{tag}-r{r:02d}-t{seed}", params))
    return specs


def execute(spec: RunSpec, ctx: RunContext) -> dict[str, Any]:
    """A LoRA run (``_classification.run_classification``) or the task's probe (``suggest_ranks``)."""
    if spec.params["kind"] == "probe":
        return _probe(spec.params, ctx)
    return run_classification(spec.params, ctx)


def _probe(params: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    from experiments.models import resolve_targets
    from lora_fast.allocation import suggest_ranks
    from lora_fast.train import TrainConfig

    seed = params["train_seed"]
    train_set, eval_set = task_data(params, ctx)
    m = ModelSettings(**params["model"])
    model, tokenizer = ctx.classifier(m, train_set.num_classes, seed)
    settings = {k: v for k, v in params["train"].items() if k not in LORA_KEYS}
    settings.update(eval_every=0, snapshot_every=0)
    config = TrainConfig(seed=seed, max_length=m.max_length, device=ctx.device, progress=ctx.progress, **settings)
    probe = params["probe"]
    torch.manual_seed(seed)
    suggestion = suggest_ranks(model, train_set, resolve_targets(model, params["train"]["targets"]), eval_data=eval_set,
                               tokenizer=tokenizer, train_config=config, probe_rank=probe["rank"],
                               probe_steps=probe["steps"], alpha=params["train"]["alpha"],
                               threshold=probe["threshold"], quantile=probe["quantile"],
                               modules_to_save=["classifier"])  # fmt: skip
    energy = list(suggestion.energy_ranks.values())
    return {
        "accuracy": suggestion.probe_metrics["accuracy"],
        "suggested_rank": suggestion.rank,
        "median_energy_rank": suggestion.uniform_estimate,
        "mean_energy_rank": statistics.fmean(energy),
        "max_energy_rank": max(energy),
        "suggestion": suggestion.as_dict(),
        "classes": list(train_set.class_names),
        "eval_examples": len(eval_set),
    }


# ------------------------------------------------------------------------------------------------------- report


def needed_rank(accuracy_by_rank: dict[int, list[float]], reference: str = "largest") -> tuple[int, float]:
    """(needed rank, seed spread): the smallest rank whose mean accuracy is within one seed spread of the reference
    rank's, the spread being the standard deviation over seeds pooled over the ranks (every rank needs 2+ seeds).

    Args:
        accuracy_by_rank: accuracies over seeds per rank.
        reference: ``"largest"``, the largest rank (the study's definition), or ``"best"``, the rank with the highest
            mean accuracy (a check for tasks where the largest rank trained worse than smaller ones).
    """
    if reference not in ("largest", "best"):
        raise ValueError(f"needed_rank: reference must be 'largest' or 'best', got {reference!r}")
    ranks = sorted(accuracy_by_rank)
    groups = [accuracy_by_rank[r] for r in ranks]
    if any(len(g) < 2 for g in groups):
        raise ValueError("needed_rank: every rank needs at least two seeds")
    pooled = math.sqrt(sum((len(g) - 1) * statistics.variance(g) for g in groups) / sum(len(g) - 1 for g in groups))
    means = {r: statistics.fmean(accuracy_by_rank[r]) for r in ranks}
    target = means[ranks[-1]] if reference == "largest" else max(means.values())
    return next(r for r in ranks if means[r] >= target - pooled), pooled


def task_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per task with a probe and 2+ seeds at every rank: family, n, subset, accuracy per rank, needed
    rank, seed spread and the probe's predictions.

    Args:
        rows: the study's finished rows.
    """
    runs: dict[tuple, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    probes: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        p = row["params"]
        key = (p["family"], p["n_classes"], p["subset"])
        if p["kind"] == "probe":
            probes[key] = row
        else:
            runs[key][p["train"]["r"]].append(row["accuracy"])
    tasks = []
    for key in sorted(probes):
        by_rank = runs.get(key)
        if not by_rank or len(by_rank) < 2 or any(len(v) < 2 for v in by_rank.values()):
            continue
        needed, spread = needed_rank(by_rank)
        needed_vs_best, _ = needed_rank(by_rank, reference="best")
        probe = probes[key]
        top = max(by_rank)
        suggested = probe["suggested_rank"]
        at_suggested = min((r for r in by_rank if r >= suggested), default=top)
        tasks.append({
            "family": key[0], "n_classes": key[1], "subset": key[2], "needed_rank": needed, "seed_spread": spread,
            "needed_rank_vs_best": needed_vs_best,
            "accuracy": {r: statistics.fmean(v) for r, v in sorted(by_rank.items())},
            "median_energy_rank": probe["median_energy_rank"], "mean_energy_rank": probe["mean_energy_rank"],
            "max_energy_rank": probe["max_energy_rank"], "suggested_rank": suggested,
            "accuracy_at_suggested": statistics.fmean(by_rank[at_suggested]), "suggested_trained_at": at_suggested,
            "accuracy_at_reference": statistics.fmean(by_rank[top]), "probe_accuracy": probe["accuracy"],
        })  # fmt: skip
    return tasks


def _log2_ratio_interval(needed: list[float], predicted: list[float]) -> tuple[float, float, float]:
    """Geometric mean of needed / predicted with a 95% t interval (from log2 ratios over tasks)."""
    logs = [math.log2(a) - math.log2(b) for a, b in zip(needed, predicted, strict=True)]
    mean, half = mean_ci(logs)
    return 2**mean, 2 ** (mean - half), 2 ** (mean + half)


def _rho_cell(fit: dict[str, float]) -> str:
    return fmt_ci(fit["rho"], fit["lo"], fit["hi"], 2) if math.isfinite(fit["rho"]) else "n/a (no spread)"


def _call(fit: dict[str, float]) -> str:
    if not (math.isfinite(fit["lo"]) and math.isfinite(fit["hi"])):
        return "inconclusive (no interval: too few tasks or no spread)"
    if fit["lo"] > 0:
        return "predicts (interval above 0)"
    if fit["hi"] < 0:
        return "anti-correlated (interval below 0)"
    return "inconclusive (interval spans 0)"


def report(rows: list[dict[str, Any]], config: SweepConfig, outdir: Path, name: str = NAME) -> str:
    """Tables ``tasks.md``, ``prediction.md`` (+ ``prediction.json``) and plots ``needed_vs_predicted.png``,
    ``accuracy_vs_rank.png``."""
    outdir.mkdir(parents=True, exist_ok=True)
    sec = config.section(name)
    tasks = task_table(rows)
    if len(tasks) < 1:
        return f"### {name}\n\nno task has its probe and 2+ seeds at every rank yet.\n"
    ranks = sorted({r for t in tasks for r in t["accuracy"]})
    families = [f for f in sec.families if any(t["family"] == f for t in tasks)]

    text = (f"## Tasks ({len(tasks)}): accuracy per uniform rank (mean over {len(sec.seeds)} seeds), needed rank, "
            "probe\n\nNeeded: smallest rank within one seed spread (pooled SD over seeds) of the largest rank; (vs "
            "best): of the rank with the best mean accuracy, which differs where the largest rank trained worse. "
            f"Probe: {sec.probe_steps} steps at r = {sec.probe_rank}; energy ranks at {sec.threshold:g} of the energy, "
            "median over adapters; suggested = rounded up to a power of two.\n\n")  # fmt: skip
    text += markdown_table(
        ["family", "n", "subset", *[f"r={r}" for r in ranks], "seed SD", "needed", "needed (vs best)",
         "median energy rank",
         "suggested", "acc. at suggested − at r=" + str(ranks[-1])],
        [[t["family"], t["n_classes"], t["subset"], *[t["accuracy"].get(r, "n/a") for r in ranks], t["seed_spread"],
          t["needed_rank"], t["needed_rank_vs_best"], t["median_energy_rank"], t["suggested_rank"],
          f"{t['accuracy_at_suggested'] - t['accuracy_at_reference']:+.3f}"] for t in tasks],
    )  # fmt: skip
    atomic_write_text(outdir / "tasks.md", text)

    groups = {"all": tasks, **{f: [t for t in tasks if t["family"] == f] for f in families}}
    results = {}
    table = []
    for label, group in groups.items():
        needed = [t["needed_rank"] for t in group]
        needed_vs_best = [t["needed_rank_vs_best"] for t in group]
        median_energy = [t["median_energy_rank"] for t in group]
        classes_minus_one = [t["n_classes"] - 1 for t in group]
        fits = {
            "median energy rank": spearman_ci(median_energy, needed),
            "suggested rank": spearman_ci([t["suggested_rank"] for t in group], needed),
            "max energy rank": spearman_ci([t["max_energy_rank"] for t in group], needed),
            "n − 1 (baseline)": spearman_ci(classes_minus_one, needed),
            "median energy rank (needed vs best rank)": spearman_ci(median_energy, needed_vs_best),
            "n − 1 (needed vs best rank)": spearman_ci(classes_minus_one, needed_vs_best),
        }
        ratio = _log2_ratio_interval(needed, median_energy) if len(group) >= 2 else None
        enough = sum(t["suggested_rank"] >= t["needed_rank"] for t in group)
        loss = [t["accuracy_at_suggested"] - t["accuracy_at_reference"] for t in group]
        results[label] = {"tasks": len(group), "spearman": fits, "needed_over_predicted": ratio,
                          "suggestion_enough": enough,
                          "accuracy_change_at_suggested": statistics.fmean(loss)}  # fmt: skip
        for predictor, fit in fits.items():
            table.append([label, len(group), predictor, _rho_cell(fit), f"{fit['p']:.3g}" if math.isfinite(fit["p"])
                          else "n/a", _call(fit)])  # fmt: skip
    text = ("## Does the probe's energy rank predict the needed rank? (Spearman's rho over tasks, 95% bootstrap "
            "interval)\n\n")  # fmt: skip
    text += markdown_table(["tasks", "count", "predictor", "rho [95% CI]", "p", "call"], table)
    text += "\n## Calibration and cost of following the suggestion\n\n"
    text += markdown_table(
        ["tasks", "needed / median energy rank (geometric mean [95% CI])", "suggestion ≥ needed",
         f"accuracy change at the suggested rank vs r={ranks[-1]} (mean)"],
        [[label, fmt_ci(*r["needed_over_predicted"], 3) if r["needed_over_predicted"] else "n/a",
          f"{r['suggestion_enough']}/{r['tasks']}", f"{r['accuracy_change_at_suggested']:+.4f}"]
         for label, r in results.items()],
    )  # fmt: skip
    text += (
        "\nA ratio below 1 means the energy rank over-states the need: `suggest_ranks(..., scale=ratio)` centres the "
        "prediction on these tasks (a calibration for these models and data, not a law).\n"
    )
    atomic_write_text(outdir / "prediction.md", text)
    atomic_write_json(outdir / "prediction.json", {"tasks": tasks, "results": results})

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.8))
    markers = {"text": "o", "vit": "s"}
    for ax, key, xlabel in ((axes[0], "median_energy_rank", "median energy rank after the probe"),
                            (axes[1], "n_minus_1", "n − 1 (classes − 1)")):  # fmt: skip
        for family in families:
            group = groups[family]
            xs = [t["n_classes"] - 1 if key == "n_minus_1" else t[key] for t in group]
            jitter = [2 ** (0.06 * ((i % 5) - 2)) for i in range(len(group))]  # tasks with equal needs stay visible
            ax.scatter(xs, [t["needed_rank"] * j for t, j in zip(group, jitter, strict=True)], marker=markers[family],
                       alpha=0.75, label=family)  # fmt: skip
        ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="needed uniform rank",
               yticks=ranks, yticklabels=[str(r) for r in ranks])  # fmt: skip
        fit = results["all"]["spearman"]["median energy rank" if key != "n_minus_1" else "n − 1 (baseline)"]
        ax.set_title(f"rho = {_rho_cell(fit)}", fontsize=9)
        ax.legend(fontsize=8)
    top = max(max(t["median_energy_rank"] for t in tasks), ranks[-1])
    axes[0].plot([1, top], [1, top], "k:", lw=0.8)
    fig.suptitle("Needed rank vs predicted, one point per task", fontsize=10)
    fig.tight_layout()
    save_figure(fig, outdir / "needed_vs_predicted.png")

    fig, axes = plt.subplots(1, len(families), figsize=(4.8 * len(families), 3.6), squeeze=False)
    for ax, family in zip(axes[0], families, strict=True):
        for t in groups[family]:
            ax.plot(ranks, [t["accuracy"].get(r, math.nan) for r in ranks], marker=".", lw=1, alpha=0.8,
                    label=f"n={t['n_classes']} s{t['subset']}")  # fmt: skip
        ax.set(xscale="log", xticks=ranks, xticklabels=[str(r) for r in ranks], xlabel="uniform LoRA rank",
               ylabel="accuracy (mean over seeds)", title=family)  # fmt: skip
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    save_figure(fig, outdir / "accuracy_vs_rank.png")

    overall = results["all"]
    lines = [f"### {name}: {len(tasks)} tasks ({', '.join(f'{len(groups[f])} {f}' for f in families)}), ranks "
             f"{ranks}, {len(sec.seeds)} seeds, probe {sec.probe_steps} steps at r = {sec.probe_rank}", ""]  # fmt: skip
    for predictor in ("median energy rank", "n − 1 (baseline)", "median energy rank (needed vs best rank)"):
        fit = overall["spearman"][predictor]
        lines.append(f"- needed rank vs {predictor}: rho {_rho_cell(fit)} over {overall['tasks']} tasks: {_call(fit)}")
    if overall["needed_over_predicted"]:
        ratio = fmt_ci(*overall["needed_over_predicted"], 3)
        lines.append(f"- needed / median energy rank: {ratio} (geometric mean); the suggestion was enough on "
                     f"{overall['suggestion_enough']}/{overall['tasks']} tasks and changed accuracy by "
                     f"{overall['accuracy_change_at_suggested']:+.4f} vs r = {ranks[-1]}")  # fmt: skip
    return "\n".join(lines) + "\n"
