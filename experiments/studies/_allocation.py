"""The per-layer rank allocation protocol two studies share (``rank_allocation`` on a text classifier,
``rank_allocation_causal_lm`` on a causal LM): settings, plan, one run, report.

Strategies (library code in ``lora_fast.allocation``): uniform r=8 and r=16; linear decay 16→4 over depth;
attention-heavy (16 on attention projections, 4 on MLP layers); "empirical" (early/middle/late thirds at
60/120/100% of r=8); a per-layer list from a JSON file under ``experiments/configs``; warm-up importance; PEFT's
AdaLoRA (init_r 12 pruned to an average of 8; ``experiments.baselines.adalora``); and energy-rank guided (ranks ∝
energy rank, at uniform r=8's parameter budget).

Probe-based strategies (warm-up importance, energy-rank guided) spend the first ``probe_steps`` of the same step
budget training uniform r=8, then ``lora_fast.allocation.reallocate`` scores the adapters, chooses ranks and
re-factors every adapter to its new rank from the truncated SVD of what it learned (the probe is continued, not
discarded), and the remaining steps train with a fresh optimizer and schedule. Their wall time includes the probe
and the scoring.

Every run reports the real per-module ranks read from the trained model (for AdaLoRA the singular values left
unmasked), LoRA parameters Σ r·(k+n), trainable parameters, time, and accuracy / macro-F1 / eval loss (classifier)
or eval loss / perplexity (causal LM). Training clips the gradient norm and stops with an error on a non-finite
loss, so a finished run is a finite run.

Ties (``experiments.runner.analysis.seed_summary``): the best strategy is the one with the best mean over seeds;
another ties with it when the difference of means is within the larger of the two strategies' seed ranges.
With one seed nothing is called.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from experiments.runner.analysis import compare
from experiments.runner.analysis import seed_summary
from experiments.runner.config import ConfigError
from experiments.runner.config import ModelSettings
from experiments.runner.config import SweepConfig
from experiments.runner.config import TrainSettings
from experiments.runner.context import RunContext
from experiments.runner.report import markdown_table
from experiments.runner.report import pyplot
from experiments.runner.report import save_figure
from experiments.runner.spec import RunSpec
from experiments.runner.store import atomic_write_text

STRATEGIES = (
    "uniform8",
    "uniform16",
    "linear_decay",
    "attention_heavy",
    "empirical",
    "custom",
    "warmup_importance",
    "adalora",
    "energy_guided",
)
PROBED = ("warmup_importance", "energy_guided")
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


@dataclasses.dataclass(frozen=True)
class WarmupSettings:
    """Warm-up importance: score = alpha·gradient term + beta·weight-change term, ranks in [r_min, r_max]; the
    gradient term is measured on ``batches`` random training batches."""

    alpha: float = 0.5
    beta: float = 0.5
    r_min: int = 4
    r_max: int = 16
    batches: int = 2


@dataclasses.dataclass(frozen=True)
class EnergySettings:
    """Energy-guided: ranks ∝ energy rank at ``threshold``, under uniform ``budget_rank``'s parameter count."""

    threshold: float = 0.95
    budget_rank: int = 8
    r_min: int = 2
    r_max: int = 32


@dataclasses.dataclass(frozen=True)
class AdaloraSettings:
    """AdaLoRA: every module starts at ``init_r`` and is pruned to an average of ``target_r``."""

    init_r: int = 12
    target_r: int = 8


def _default_train() -> TrainSettings:
    return TrainSettings(lr=3e-3, max_steps=36, batch_size=16)


@dataclasses.dataclass(frozen=True)
class AllocationSettings:
    """Settings of an allocation study (the classifier and causal-LM studies extend it with their data).

    Args:
        scale: one line describing the scale, printed in the tables.
        train_size: training examples (or dialogue pairs).
        eval_size: evaluation examples.
        model: the base model.
        targets: module-name suffixes that get adapters.
        strategies: which of ``STRATEGIES`` to run.
        seeds: training seeds (the data sample is fixed by the global ``seed``).
        probe_steps: steps of the probe of probe-based strategies (part of ``train.max_steps``).
        match_budget: fit every non-uniform strategy (linear decay, attention-heavy, empirical, the per-layer list,
            warm-up importance) to the parameter budget of uniform ``energy.budget_rank``, keeping its shape (ranks
            proportional to the strategy's own), so every strategy trains the same number of LoRA parameters.
        alpha: LoRA alpha of every strategy.
        custom_ranks: JSON file of per-layer ranks for ``custom`` (relative to experiments/configs, or a path).
        train: ``TrainConfig`` fields; ``max_steps`` is every strategy's whole step budget.
        warmup: warm-up importance settings.
        energy: energy-guided settings.
        adalora: AdaLoRA settings.
    """

    scale: str = "small-scale CPU demo: 6-layer MiniLM, 8 WordNet classes, 384 train glosses, 36 steps, 2 seeds"
    train_size: int = 384
    eval_size: int = 192
    model: ModelSettings = dataclasses.field(default_factory=lambda: ModelSettings("minilm", 6, 24))
    targets: tuple[str, ...] = ("query", "key", "value", "attention.output.dense", "intermediate.dense",
                                "output.dense")  # fmt: skip
    strategies: tuple[str, ...] = STRATEGIES
    seeds: tuple[int, ...] = (0, 1)
    probe_steps: int = 9
    match_budget: bool = False
    alpha: float = 16.0
    custom_ranks: str = "rank_allocation_layers_6.json"
    train: TrainSettings = dataclasses.field(default_factory=_default_train)
    warmup: WarmupSettings = dataclasses.field(default_factory=WarmupSettings)
    energy: EnergySettings = dataclasses.field(default_factory=EnergySettings)
    adalora: AdaloraSettings = dataclasses.field(default_factory=AdaloraSettings)

    def __post_init__(self) -> None:
        unknown = set(self.strategies) - set(STRATEGIES)
        if unknown:
            raise ConfigError(f"strategies: unknown {sorted(unknown)}; known: {', '.join(STRATEGIES)}")
        if not 0 < self.probe_steps < self.train["max_steps"]:
            raise ConfigError(f"need 0 < probe_steps < train.max_steps, got {self.probe_steps} and "
                              f"{self.train['max_steps']}")  # fmt: skip
        if not self.seeds:
            raise ConfigError("seeds: need at least one seed")


@dataclasses.dataclass(frozen=True)
class ClassifierAllocation(AllocationSettings):
    """``AllocationSettings`` plus the classification data (one class subset drawn from the global seed).

    Args:
        dataset: a corpus of ``experiments.data.DATASETS``.
        dataset_options: keyword arguments of its loader (e.g. ``{size: 56}`` for clip art).
        test_fraction: share of each class held out as the evaluation pool.
        min_per_class: only classes with at least this many examples are drawn.
        n_classes: classes of the task.
    """

    dataset: str = "wordnet"
    dataset_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    test_fraction: float = 0.2
    min_per_class: int = 500
    n_classes: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        from experiments.data import DATASETS
        from experiments.data import dataset_options

        if self.dataset not in DATASETS:
            raise ConfigError(f"dataset: unknown {self.dataset!r}; available: {', '.join(sorted(DATASETS))}")
        unknown = [k for k in self.dataset_options if k not in dataset_options(self.dataset)]
        if unknown:
            raise ConfigError(f"dataset_options: {self.dataset} has no option {unknown[0]!r}")
        if self.n_classes < 2:
            raise ConfigError(f"n_classes must be >= 2, got {self.n_classes}")


def plan_runs(config: SweepConfig, name: str, task: str) -> list[RunSpec]:
    """One run per (strategy, seed); the data sample is fixed by the global ``seed``, so seeds vary training only.

    Args:
        config: the resolved configuration.
        name: the study that executes the runs.
        task: ``"classification"`` or ``"causal_lm"``.
    """
    sec = config.section(name)
    common = {k: v for k, v in _plain(sec).items() if k not in ("strategies", "seeds", "scale")}
    return [
        RunSpec.make(name, f"{strategy}-s{seed}", {**common, "task": task, "strategy": strategy, "seed": seed,
                                                   "data_seed": config.seed})
        for seed in sec.seeds
        for strategy in sec.strategies
    ]  # fmt: skip


def _plain(section: Any) -> dict[str, Any]:
    return json_roundtrip(dataclasses.asdict(section))


def json_roundtrip(value: Any) -> Any:
    """``value`` as JSON would give it back (tuples as lists), so params compare equal after a resume."""
    import json

    return json.loads(json.dumps(value))


# ----------------------------------------------------------------------------------------------- model and data


def _classification_data(params: dict[str, Any], ctx: RunContext) -> tuple[Any, Any]:
    from experiments.data import sampling

    train_pool, test_pool = ctx.dataset_split(params["dataset"], params["test_fraction"], 0, params["dataset_options"])
    counts = train_pool.class_counts() + test_pool.class_counts()
    eligible = [c for c, k in enumerate(counts.tolist()) if k >= params["min_per_class"]]
    classes = sampling.sample_class_subsets(eligible, params["n_classes"], 1, params["data_seed"])[0]
    train_set = sampling.balanced_subset(train_pool, classes, params["train_size"], params["data_seed"])
    eval_set = sampling.balanced_subset(test_pool, classes, params["eval_size"], params["data_seed"])
    return train_set, eval_set


def _setup(params: dict[str, Any], ctx: RunContext, seed: int) -> tuple[nn.Module, Any, Any, Any]:
    """(fresh base model, tokenizer, train data, eval data) of a run."""
    m = ModelSettings(**params["model"])
    if params["task"] == "causal_lm":
        from experiments.data.dialogue import chatml
        from experiments.data.dialogue import load_chitchat_pairs

        model, tokenizer = ctx.causal_lm(m)
        train_pairs, eval_pairs = ctx.cached(
            ("chitchat", params["train_size"], params["eval_size"], params["data_seed"]),
            lambda: load_chitchat_pairs(params["train_size"], params["eval_size"], seed=params["data_seed"]),
        )
        return model, tokenizer, [chatml(p) for p in train_pairs], [chatml(p) for p in eval_pairs]
    keys = ("dataset", "dataset_options", "test_fraction", "min_per_class", "n_classes", "train_size", "eval_size",
            "data_seed")  # fmt: skip
    train_set, eval_set = ctx.cached(
        ("allocation_data", json.dumps([params[k] for k in keys], sort_keys=True)),
        lambda: _classification_data(params, ctx),
    )
    model, tokenizer = ctx.classifier(m, params["n_classes"], seed)
    return model, tokenizer, train_set, eval_set


def _train_config(params: dict[str, Any], ctx: RunContext, steps: int, seed: int) -> Any:
    from lora_fast.train import TrainConfig

    settings = {**params["train"], "max_steps": steps}
    settings.setdefault("energy_threshold", params["energy"]["threshold"])
    return TrainConfig(max_length=params["model"]["max_length"], seed=seed, device=ctx.device, progress=ctx.progress,
                       task=params["task"], **settings)  # fmt: skip


def _device(ctx: RunContext) -> torch.device:
    if ctx.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(ctx.device)


def _gradient_batches(
    params: dict[str, Any], tokenizer: Any, train_data: Any, device: torch.device
) -> tuple[list[dict[str, torch.Tensor]], Any]:
    """(``warmup.batches`` random training batches (fixed by the run seed) as ``model(**batch)`` inputs, the loss
    function of ``gradient_norms``: None when the batches carry labels the model turns into ``output.loss``).

    Random, not the first ones: ``balanced_subset`` stores the examples class by class.
    """
    size, count = params["train"]["batch_size"], params["warmup"]["batches"]
    order = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(params["seed"]))
    classification = params["task"] == "classification"
    if classification and getattr(train_data, "inputs", None) is not None:
        # a model of tensors (the ViT) returns logits: the loss takes each batch's labels, in the order
        # gradient_norms consumes the batches (once each)
        parts = [order[i * size : (i + 1) * size] for i in range(count)]
        labels = iter([train_data.labels[part].to(device) for part in parts])
        batches = [{"x": train_data.inputs[part].to(device)} for part in parts]
        return batches, lambda logits: torch.nn.functional.cross_entropy(logits.float(), next(labels))
    batches = []
    for i in range(count):
        part = order[i * size : (i + 1) * size].tolist()
        texts = [train_data.texts[j] if classification else train_data[j] for j in part]
        enc = tokenizer(texts, truncation=True, max_length=params["model"]["max_length"], padding=True,
                        return_tensors="pt")  # fmt: skip
        if classification:
            labels = train_data.labels[part]
        else:
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        batches.append({**{k: v.to(device) for k, v in enc.items()}, "labels": labels.to(device)})
    return batches, None


def _fixed_pattern(strategy: str, targets: Sequence[Any], params: dict[str, Any]) -> dict[str, int]:
    """The strategy's pattern; with ``match_budget``, a non-uniform one is refitted (same shape) to the budget."""
    from lora_fast import allocation

    pattern = _shape_pattern(strategy, targets, params)
    if params.get("match_budget") and strategy not in ("uniform8", "uniform16", *PROBED):
        budget = allocation.lora_param_count(targets, allocation.uniform(targets, params["energy"]["budget_rank"]))
        pattern = allocation.fit_budget(targets, {k: float(v) for k, v in pattern.items()}, budget, 1,
                                        max(pattern.values()) * 4)  # fmt: skip
    return pattern


def _shape_pattern(strategy: str, targets: Sequence[Any], params: dict[str, Any]) -> dict[str, int]:
    from lora_fast import allocation

    if strategy in ("uniform8", *PROBED):  # probes start as uniform r=8
        return allocation.uniform(targets, 8)
    if strategy == "uniform16":
        return allocation.uniform(targets, 16)
    if strategy == "linear_decay":
        return allocation.linear_decay(targets, 16, 4)
    if strategy == "attention_heavy":
        return allocation.attention_heavy(targets, 16, 4)
    if strategy == "empirical":
        return allocation.empirical(targets, 8, (0.6, 1.2, 1.0))
    if strategy == "custom":
        return allocation.load_layer_list(targets, CONFIG_DIR / params["custom_ranks"])
    raise ValueError(f"no fixed pattern for {strategy!r}")


def execute(spec: RunSpec, ctx: RunContext) -> dict[str, Any]:
    """Train one (strategy, seed) run and return metrics, real ranks and costs."""
    from experiments.baselines.adalora import adalora_config
    from experiments.baselines.adalora import train_adalora
    from experiments.models import resolve_targets
    from lora_fast import allocation
    from lora_fast.injection import inject
    from lora_fast.injection import lora_modules
    from lora_fast.train import train

    params, seed = spec.params, spec.params["seed"]
    strategy, steps = params["strategy"], params["train"]["max_steps"]
    start = time.perf_counter()
    base, tokenizer, train_data, eval_data = _setup(params, ctx, seed)
    names = resolve_targets(base, params["targets"])
    targets = allocation.find_targets(base, names)
    classification = params["task"] == "classification"
    # a Hugging Face classifier keeps its head trainable under PEFT's SEQ_CLS; a plain module (the ViT) names it
    hf_model = hasattr(base, "config") and hasattr(base, "num_labels")
    extra: dict[str, Any] = {"budget_params": allocation.lora_param_count(
        targets, allocation.uniform(targets, params["energy"]["budget_rank"]))}  # fmt: skip
    if strategy == "adalora":
        task_type = ("SEQ_CLS" if hf_model else None) if classification else "CAUSAL_LM"
        config = adalora_config(names, total_step=steps, target_r=params["adalora"]["target_r"],
                                init_r=params["adalora"]["init_r"], lora_alpha=params["alpha"],
                                modules_to_save=["classifier"] if classification and not hf_model else None,
                                task_type=task_type)  # fmt: skip
        result, model, ranks = train_adalora(base, config, train_data, eval_data,
                                             _train_config(params, ctx, steps, seed), tokenizer, seed)  # fmt: skip
        phases = [result]
    else:
        torch.manual_seed(seed)
        pattern = _fixed_pattern(strategy, targets, params)
        model = inject(base, names, r=8, alpha=params["alpha"], rank_pattern=pattern,
                       modules_to_save=["classifier"] if classification else None)  # fmt: skip
        phases = []
        if strategy in PROBED:
            probe_eval = eval_data.select(list(range(8))) if classification else eval_data[:4]
            probe_config = _train_config(params, ctx, params["probe_steps"], seed)

            def probe(m: nn.Module) -> Any:
                return train(m, train_data, probe_eval, probe_config, tokenizer)

            if strategy == "energy_guided":
                e = params["energy"]
                budget = allocation.lora_param_count(targets, allocation.uniform(targets, e["budget_rank"]))
                done = allocation.reallocate(model, probe, "energy", budget=budget, r_min=e["r_min"],
                                             r_max=e["r_max"], threshold=e["threshold"])  # fmt: skip
                extra["probe_energy_ranks"] = {k: int(v) for k, v in done.scores.items()}
            else:
                w = params["warmup"]
                batches, loss_fn = _gradient_batches(params, tokenizer, train_data, _device(ctx))
                budget = extra["budget_params"] if params.get("match_budget") else None
                done = allocation.reallocate(model, probe, "warmup", budget=budget, batches=batches, loss_fn=loss_fn,
                                             r_min=w["r_min"], r_max=w["r_max"], alpha=w["alpha"],
                                             beta=w["beta"])  # fmt: skip
            phases.append(done.probe_result)
            extra["scoring_time_s"] = done.scoring_time_s
            steps -= params["probe_steps"]
        # a different shuffling seed after a probe, so the continuation does not replay the probe's batches
        result = train(model, train_data, eval_data, _train_config(params, ctx, steps, seed + 1000 * len(phases)),
                       tokenizer)  # fmt: skip
        phases.append(result)
        ranks = {name: layer.r for name, layer in lora_modules(model).items()}
    wall = time.perf_counter() - start
    by_name = {t.name: t for t in targets}
    n_layers = allocation.num_layers(targets)
    losses = [v for p in phases for v in p.train_loss]
    return {
        "strategy": strategy,
        "seed": seed,
        "accuracy": result.accuracy,
        "macro_f1": result.macro_f1,
        "eval_loss": result.eval_loss,
        "perplexity": result.perplexity,
        "finite": all(p.finite for p in phases) and all(math.isfinite(v) for v in [*losses, result.eval_loss]),
        "final_train_loss": statistics.fmean(losses[-8:]),
        "train_loss": losses[::4],
        "steps": sum(p.steps for p in phases),
        "lora_params": sum(r * by_name[name].params_per_rank() for name, r in ranks.items()),
        "trainable_params": result.trainable_params,
        "wall_time_s": wall,
        "train_time_s": sum(p.wall_time_s for p in phases),
        "peak_memory_bytes": max(p.peak_memory_bytes for p in phases),
        "peak_memory_kind": result.peak_memory_kind,
        "ranks": ranks,
        "layer_ranks": [
            statistics.fmean(r for n, r in ranks.items() if by_name[n].layer == i) for i in range(n_layers)
        ],
        **extra,
    }


# ------------------------------------------------------------------------------------------------------- report


def report_runs(rows: list[dict[str, Any]], sec: AllocationSettings, outdir: Path, name: str) -> str:
    """Tables (``strategies.md``, ``layer_ranks.md``) and plots (``frontier.png``, ``layer_ranks.png``).

    Args:
        rows: finished runs of the study.
        sec: the study's section.
        outdir: this study's results folder.
        name: the study's name.
    """
    outdir.mkdir(parents=True, exist_ok=True)
    if not rows:
        return f"### {name}\n\nno finished runs.\n"
    classification = rows[0]["params"]["task"] == "classification"
    metric, higher = ("accuracy", True) if classification else ("eval_loss", False)
    order = [s for s in STRATEGIES if any(r["strategy"] == s for r in rows)]
    stats = {s["group"]: s for s in seed_summary(rows, "strategy", metric, higher)}

    def mean_of(strategy: str, field: str) -> float:
        vals = [r[field] for r in rows if r["strategy"] == strategy and r[field] is not None]
        return statistics.fmean(vals) if vals else float("nan")

    extra_cols = ["macro-F1", "eval loss"] if classification else ["perplexity"]
    table = []
    for s in order:
        st = stats[s]
        extra = [mean_of(s, "macro_f1"), mean_of(s, "eval_loss")] if classification else [mean_of(s, "perplexity")]
        table.append([s, st["seeds"], f"{st['mean']:.4f} [{st['min']:.4f}, {st['max']:.4f}]", *extra,
                      st["verdict"], int(mean_of(s, "lora_params")), int(mean_of(s, "trainable_params")),
                      mean_of(s, "wall_time_s"), all(r["finite"] for r in rows if r["strategy"] == s)])  # fmt: skip
    text = f"# Rank allocation strategies ({sec.scale})\n\n"
    text += (f"{metric} over seeds: mean [min, max]. Ties: |difference of means| ≤ the larger seed range. "
             "LoRA params = Σ r·(k+n) with the real final ranks (AdaLoRA: unmasked singular values; it trains "
             f"init_r={sec.adalora.init_r} everywhere, counted in trainable params).\n\n")  # fmt: skip
    text += markdown_table(
        ["strategy", "seeds", metric, *extra_cols, "verdict", "LoRA params", "trainable params", "time (s)",
         "all finite"], table)  # fmt: skip
    sentences = [compare(list(stats.values()), "energy_guided", other, higher) for other in
                 ("uniform8", "uniform16", "adalora", "warmup_importance")]  # fmt: skip
    text += "\n" + "\n".join(f"- {s}" for s in sentences) + "\n"
    atomic_write_text(outdir / "strategies.md", text)

    n_layers = len(rows[0]["layer_ranks"])
    layer_rows = [[s, *[statistics.fmean(r["layer_ranks"][i] for r in rows if r["strategy"] == s)
                        for i in range(n_layers)]] for s in order]  # fmt: skip
    layer_text = f"# Mean LoRA rank per layer (over the layer's adapted modules and seeds), {sec.scale}\n\n"
    layer_text += markdown_table(["strategy", *[f"layer {i}" for i in range(n_layers)]], layer_rows)
    atomic_write_text(outdir / "layer_ranks.md", layer_text)

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for s in order:
        st = stats[s]
        x = mean_of(s, "lora_params")
        ax.errorbar([x], [st["mean"]], yerr=[[st["mean"] - st["min"]], [st["max"] - st["mean"]]], fmt="o", capsize=3,
                    label=s)  # fmt: skip
    n_seeds = max(st["seeds"] for st in stats.values())
    ax.set(xlabel="LoRA parameters Σ r·(k+n) (real final ranks)", ylabel=metric,
           title=f"Efficiency frontier ({n_seeds} seed(s); bars: min–max over seeds)")  # fmt: skip
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, outdir / "frontier.png")

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for s in order:
        ax.plot(range(n_layers), layer_rows[order.index(s)][1:], marker="o", label=s)
    ax.set(xlabel="layer", ylabel="mean rank of the layer's adapters", title="Per-layer rank chosen by each strategy")
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, outdir / "layer_ranks.png")

    summary = f"### {name}\n\n{sec.scale}; {metric} over {n_seeds} seed(s); tables and plots in {outdir}.\n\n"
    summary += markdown_table(
        ["strategy", metric, "verdict", "LoRA params"],
        [[s, f"{stats[s]['mean']:.4f}", stats[s]["verdict"], int(mean_of(s, "lora_params"))] for s in order],
    )
    return summary + "\n" + "\n".join(f"- {s}" for s in sentences) + "\n"
