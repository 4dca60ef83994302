"""LoRA vs full fine-tuning: cost (parameters, time, memory) and accuracy at several ranks, same data and steps.

Trainable parameters, wall time, peak memory, accuracy and macro-F1 of full fine-tuning and of LoRA at several
ranks, on the same data with the same step budget.

Runs go through ``_classification.run_classification`` (the data, head initialisation and training loop of studies 1-3),
with LoRA on every linear layer of the encoder. Peak memory on CPU is the process's resident set size (it includes
the Python process and every model cached so far), so compare rows of one invocation, not absolute values; on CUDA
it is ``max_memory_allocated``. Ties use ``analysis.seed_summary``'s rule (difference within the seed range).
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path
from typing import Any

from experiments.runner.analysis import compare
from experiments.runner.analysis import seed_summary
from experiments.runner.config import LoraSettings
from experiments.runner.config import ModelSettings
from experiments.runner.config import SweepConfig
from experiments.runner.config import TrainSettings
from experiments.runner.context import RunContext
from experiments.runner.report import markdown_table
from experiments.runner.report import pyplot
from experiments.runner.report import save_figure
from experiments.runner.spec import RunSpec
from experiments.runner.store import atomic_write_text
from experiments.studies._classification import ClassificationTask
from experiments.studies._classification import run_classification
from experiments.studies._classification import run_params

NAME = "lora_vs_full"

ALL_LINEAR = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


@dataclasses.dataclass(frozen=True)
class Config(ClassificationTask):
    """Settings of the LoRA-vs-full comparison (small-scale CPU defaults: 6-layer MiniLM, 8 WordNet classes, 384
    training glosses, 36 steps of batch 16 for every run, 2 seeds).

    Args:
        scale: one line describing the scale, printed in the tables.
        n_classes: classes of the task (the class subset is drawn from each run's seed).
        ranks: LoRA ranks compared with full fine-tuning.
        seeds: seeds (class subset, data sample, head init and training).
    """

    scale: str = "small-scale CPU demo: 6-layer MiniLM, 8 WordNet classes, 384 train glosses, 36 steps, 2 seeds"
    train_size: int = 384
    eval_size: int = 192
    model: ModelSettings = dataclasses.field(default_factory=lambda: ModelSettings("minilm", 6, 24))
    lora: LoraSettings = dataclasses.field(default_factory=lambda: LoraSettings(
        targets=ALL_LINEAR, r=8, alpha=16.0, lr=3e-3, max_steps=36, batch_size=16))  # fmt: skip
    full: TrainSettings = dataclasses.field(default_factory=lambda: TrainSettings(lr=1e-4, max_steps=36,
                                                                                  batch_size=16))  # fmt: skip
    n_classes: int = 8
    ranks: tuple[int, ...] = (2, 8, 32)
    seeds: tuple[int, ...] = (0, 1)


def _label(row_or_params: dict[str, Any]) -> str:
    params = row_or_params.get("params", row_or_params)
    return "full" if params["kind"] == "full" else f"lora r={params['train']['r']}"


def plan(config: SweepConfig, name: str = NAME) -> list[RunSpec]:
    """Full fine-tuning and LoRA at each rank, per seed."""
    sec = config.section(name)
    specs = []
    for seed in sec.seeds:
        specs.append(RunSpec.make(name, f"full-s{seed}", run_params(sec, "full", sec.n_classes, 0, 1, 0.0, seed)))
        for r in sec.ranks:
            variant = dataclasses.replace(sec, lora=LoraSettings({**sec.lora, "r": r}))
            params = run_params(variant, "lora", sec.n_classes, 0, 1, 0.0, seed)
            specs.append(RunSpec.make(name, f"lora-r{r}-s{seed}", params))
    return specs


def execute(spec: RunSpec, ctx: RunContext) -> dict[str, Any]:
    """Train one run (``_classification.run_classification``); adds ``label`` (``full`` or ``lora r=…``)."""
    return {"label": _label(spec.params), **run_classification(spec.params, ctx)}


def report(rows: list[dict[str, Any]], config: SweepConfig, outdir: Path, name: str = NAME) -> str:
    """Cost table ``cost.md`` and plot ``accuracy_vs_params.png``."""
    sec = config.section(name)
    outdir.mkdir(parents=True, exist_ok=True)
    if not rows:
        return f"### {name}\n\nno finished runs.\n"
    labels = ["full", *[f"lora r={r}" for r in sec.ranks]]
    labels = [lab for lab in labels if any(r["label"] == lab for r in rows)]
    stats = {s["group"]: s for s in seed_summary(rows, "label", "accuracy", True)}

    def mean_of(label: str, field: str) -> float:
        return statistics.fmean(r[field] for r in rows if r["label"] == label)

    table = [
        [lab, stats[lab]["seeds"], int(mean_of(lab, "trainable_params")), mean_of(lab, "wall_time_s"),
         mean_of(lab, "peak_memory_bytes") / 2**20, f"{stats[lab]['mean']:.4f} [{stats[lab]['min']:.4f}, "
         f"{stats[lab]['max']:.4f}]", mean_of(lab, "macro_f1"), mean_of(lab, "eval_loss"), stats[lab]["verdict"],
         all(r["finite"] for r in rows if r["label"] == lab)]
        for lab in labels
    ]  # fmt: skip
    kind = rows[0].get("peak_memory_kind", "")
    text = f"# LoRA vs full fine-tuning ({sec.scale})\n\n"
    text += (f"Same data, {sec.full['max_steps']} steps of batch {sec.full['batch_size']} for every run. "
             f"Accuracy over seeds: mean [min, max]; ties: difference within the larger seed range. Peak memory: "
             f"{kind} (on CPU the process RSS, including cached models; compare rows, not absolutes). "
             "Time: training loop only (no evaluation).\n\n")  # fmt: skip
    text += markdown_table(
        ["run", "seeds", "trainable params", "time (s)", "peak memory (MiB)", "accuracy", "macro-F1", "eval loss",
         "verdict", "all finite"], table)  # fmt: skip
    lines = [compare(list(stats.values()), lab, "full", True) for lab in labels if lab != "full"]
    text += "\n" + "\n".join(f"- {s}" for s in lines) + "\n"
    atomic_write_text(outdir / "cost.md", text)

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for lab in labels:
        st = stats[lab]
        x = mean_of(lab, "trainable_params")
        axes[0].errorbar([x], [st["mean"]], yerr=[[st["mean"] - st["min"]], [st["max"] - st["mean"]]], fmt="s" if
                         lab == "full" else "o", capsize=3, label=lab)  # fmt: skip
        axes[1].bar(lab, mean_of(lab, "wall_time_s"))
    axes[0].set(
        xscale="log", xlabel="trainable parameters", ylabel="test accuracy", title="Accuracy vs trainable params"
    )
    axes[0].legend(fontsize=8)
    axes[1].set(ylabel="training time (s)", title="Wall time, same steps")
    save_figure(fig, outdir / "accuracy_vs_params.png")

    summary = f"### {name}\n\n{sec.scale}; {max(s['seeds'] for s in stats.values())} seed(s).\n\n"
    summary += markdown_table(["run", "trainable params", "time (s)", "accuracy", "verdict"],
                              [[t[0], t[2], t[3], t[5], t[8]] for t in table])  # fmt: skip
    return summary + "\n" + "\n".join(f"- {s}" for s in lines) + "\n"
