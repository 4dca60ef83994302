"""Study: per-layer LoRA rank allocation strategies (issue 5), on a text classifier or, with ``task: causal_lm``,
on a causal LM (see ``rank_allocation_causal_lm``).

Strategies (library code in ``lora_fast.allocation``): uniform r=8 and r=16; linear decay 16→4 over depth;
attention-heavy (16 on attention projections, 4 on MLP layers); "empirical" (early/middle/late thirds at
60/120/100% of r=8); a per-layer list from a JSON file under ``experiments/configs``; warm-up importance; PEFT's
AdaLoRA (init_r 12 pruned to an average of 8); and energy-rank guided (ranks ∝ energy rank, at uniform r=8's
parameter budget).

Probe-based strategies (warm-up importance, energy-rank guided) spend the first ``probe_steps`` of the same step
budget training uniform r=8, choose ranks, re-factor every adapter to its new rank from the truncated SVD of what it
learned (``allocation.resize_adapters``, so the probe is continued, not discarded), then train the remaining steps
with a fresh optimizer and schedule. Their wall time includes the probe and the scoring.

Every run reports the real per-module ranks read from the trained model (for AdaLoRA the singular values left
unmasked), LoRA parameters Σ r·(k+n), trainable parameters, time, and accuracy / macro-F1 / eval loss (classifier)
or eval loss / perplexity (causal LM). Training clips the gradient norm at 1.0 and stops with an error on a
non-finite loss, so a finished run is a finite run.

Ties: the best strategy is the one with the best mean over seeds; another strategy ties with it when the difference
of means is within the larger of the two strategies' seed ranges (max − min). With one seed nothing is called.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from experiments.runner.analysis import markdown_table
from experiments.runner.analysis import pyplot
from experiments.runner.analysis import save_figure
from experiments.runner.config import merge
from experiments.runner.context import RunContext
from experiments.runner.spec import RunSpec
from experiments.runner.store import atomic_write_text

NAME = "rank_allocation"

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

# Small-scale CPU default (part of the 15-minute ``python experiments/run.py``): the 6-layer MiniLM of studies 1-3
# (truncated MiniLMs do not work here: with 1-3 layers the [CLS] state the classifier reads is almost the same for
# every input, std 3e-4 vs 0.22 at 6 layers, and nothing trains in a few dozen steps), 8 WordNet classes, 384
# training glosses of <= 24 tokens, 36 steps of batch 16 (a probe of 9), 2 seeds.
DEFAULTS: dict[str, Any] = {
    "scale": "small-scale CPU demo: 6-layer MiniLM, 8 WordNet classes, 384 train glosses, 36 steps, 2 seeds",
    "task": "classification",
    "dataset": "wordnet",
    "test_fraction": 0.2,
    "min_per_class": 500,
    "n_classes": 8,
    "train_size": 384,
    "eval_size": 192,
    "model": {"name": "minilm", "num_layers": 6, "max_length": 24},
    "targets": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "strategies": list(STRATEGIES),
    "seeds": [0, 1],
    "steps": 36,
    "probe_steps": 9,
    "batch_size": 16,
    "lr": 3e-3,
    "alpha": 16,
    "custom_ranks": "rank_allocation_layers_6.json",
    "warmup": {"alpha": 0.5, "beta": 0.5, "r_min": 4, "r_max": 16, "batches": 2},
    "energy": {"threshold": 0.95, "budget_rank": 8, "r_min": 2, "r_max": 32},
    "adalora": {"init_r": 12, "target_r": 8},
}


def section(config: dict[str, Any], name: str = NAME, defaults: dict[str, Any] = DEFAULTS) -> dict[str, Any]:
    """The study's config section merged over its defaults.

    Args:
        config: the resolved run configuration.
        name: section name.
        defaults: the study's defaults.
    """
    return merge(defaults, config.get(name) or {})


def plan_runs(config: dict[str, Any], name: str, defaults: dict[str, Any]) -> list[RunSpec]:
    """One run per (strategy, seed); the data sample is fixed by the global ``seed``, so seeds vary training only.

    Args:
        config: the resolved run configuration.
        name: the study that executes the runs.
        defaults: its default section.
    """
    sec = section(config, name, defaults)
    unknown = set(sec["strategies"]) - set(STRATEGIES)
    if unknown:
        raise ValueError(f"{name}: unknown strategies {sorted(unknown)}; known: {', '.join(STRATEGIES)}")
    if not 0 < sec["probe_steps"] < sec["steps"]:
        raise ValueError(f"{name}: need 0 < probe_steps < steps")
    common = {k: v for k, v in sec.items() if k not in ("strategies", "seeds", "scale")}
    return [
        RunSpec.make(name, f"{strategy}-s{seed}", {**common, "strategy": strategy, "seed": seed,
                                                   "data_seed": config.get("seed", 0)})
        for seed in sec["seeds"]
        for strategy in sec["strategies"]
    ]  # fmt: skip


def plan(config: dict[str, Any]) -> list[RunSpec]:
    """Runs of the classification study."""
    return plan_runs(config, NAME, DEFAULTS)


# ----------------------------------------------------------------------------------------------- model and data


def _classification_data(params: dict[str, Any], ctx: RunContext) -> tuple[Any, Any]:
    from lora_fast import data

    train_pool, test_pool = ctx.dataset_split(params["dataset"], params["test_fraction"], 0)
    counts = train_pool.class_counts() + test_pool.class_counts()
    eligible = [c for c, k in enumerate(counts.tolist()) if k >= params["min_per_class"]]
    classes = data.sample_class_subsets(eligible, params["n_classes"], 1, params["data_seed"])[0]
    train_set = data.balanced_subset(train_pool, classes, params["train_size"], params["data_seed"])
    eval_set = data.balanced_subset(test_pool, classes, params["eval_size"], params["data_seed"])
    return train_set, eval_set


def _causal_setup(params: dict[str, Any], ctx: RunContext) -> tuple[nn.Module, Any, list[str], list[str]]:
    from lora_fast.causal_lm import byte_tokenizer
    from lora_fast.causal_lm import load_smollm2
    from lora_fast.causal_lm import tiny_llama
    from lora_fast.data.dialogue import chatml
    from lora_fast.data.dialogue import load_chitchat_pairs

    m = params["model"]
    if m["name"] == "smollm2":
        model, tokenizer = ctx.cached(("smollm2",), load_smollm2)
    elif m["name"] == "tiny_llama":
        model = ctx.cached(("tiny_llama", m.get("num_layers", 4)), lambda: tiny_llama(layers=m.get("num_layers", 4)))
        tokenizer = ctx.cached(("byte_tokenizer",), byte_tokenizer)
    else:
        raise ValueError(f"unknown causal LM {m['name']!r}; use smollm2 or tiny_llama")
    train_pairs, eval_pairs = ctx.cached(
        ("chitchat", params["train_size"], params["eval_size"], params["data_seed"]),
        lambda: load_chitchat_pairs(params["train_size"], params["eval_size"], seed=params["data_seed"]),
    )
    return model, tokenizer, [chatml(p) for p in train_pairs], [chatml(p) for p in eval_pairs]


def _setup(params: dict[str, Any], ctx: RunContext, seed: int) -> tuple[nn.Module, Any, Any, Any]:
    """(fresh base model, tokenizer, train data, eval data) of a run."""
    m = params["model"]
    if params["task"] == "causal_lm":
        base, tokenizer, train_data, eval_data = _causal_setup(params, ctx)
        return copy.deepcopy(base), tokenizer, train_data, eval_data
    keys = ("dataset", "test_fraction", "min_per_class", "n_classes", "train_size", "eval_size", "data_seed")
    train_set, eval_set = ctx.cached(
        ("rank_allocation_data", *(params[k] for k in keys)), lambda: _classification_data(params, ctx)
    )
    model = ctx.text_classifier(m["name"], m.get("num_layers"), params["n_classes"], seed)
    return model, ctx.tokenizer(m["name"]), train_set, eval_set


def _train_config(params: dict[str, Any], ctx: RunContext, steps: int, seed: int) -> Any:
    from lora_fast.train import TrainConfig

    return TrainConfig(
        max_steps=steps,
        lr=params["lr"],
        batch_size=params["batch_size"],
        max_length=params["model"]["max_length"],
        max_grad_norm=1.0,
        seed=seed,
        device=ctx.device,
        progress=ctx.progress,
        task=params["task"],
        energy_threshold=params["energy"]["threshold"],
    )


def _gradient_batches(
    params: dict[str, Any], tokenizer: Any, train_data: Any, device: torch.device
) -> list[dict[str, torch.Tensor]]:
    """``warmup.batches`` random training batches (fixed by the run seed) as ``model(**batch)`` inputs with labels.

    Random, not the first ones: ``balanced_subset`` stores the examples class by class.
    """
    size, count = params["batch_size"], params["warmup"]["batches"]
    order = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(params["seed"]))
    batches = []
    for i in range(count):
        part = order[i * size : (i + 1) * size].tolist()
        classification = params["task"] == "classification"
        texts = [train_data.texts[j] if classification else train_data[j] for j in part]
        enc = tokenizer(texts, truncation=True, max_length=params["model"]["max_length"], padding=True,
                        return_tensors="pt")  # fmt: skip
        if classification:
            labels = train_data.labels[part]
        else:
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        batches.append({**{k: v.to(device) for k, v in enc.items()}, "labels": labels.to(device)})
    return batches


def _fixed_pattern(strategy: str, targets: Sequence[Any], params: dict[str, Any]) -> dict[str, int]:
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


def _train_adalora(
    params: dict[str, Any], ctx: RunContext, base: nn.Module, data: tuple[Any, Any, Any], seed: int
) -> tuple[Any, nn.Module, dict[str, int]]:
    from peft import get_peft_model

    from lora_fast import allocation
    from lora_fast import train as train_module

    tokenizer, train_data, eval_data = data
    classification = params["task"] == "classification"
    config = allocation.adalora_config(
        params["targets"],
        total_step=params["steps"],
        target_r=params["adalora"]["target_r"],
        init_r=params["adalora"]["init_r"],
        lora_alpha=params["alpha"],
        task_type="SEQ_CLS" if classification else "CAUSAL_LM",
    )
    torch.manual_seed(seed)
    model = get_peft_model(base, config)  # SEQ_CLS keeps the classifier head fully trainable, as the LoRA runs do
    remove = allocation.adalora_step_hook(model)
    try:
        result = train_module.train(
            model, train_data, eval_data, _train_config(params, ctx, params["steps"], seed), tokenizer
        )
    finally:
        remove()
    return result, model, allocation.adalora_ranks(model)


def execute(spec: RunSpec, ctx: RunContext) -> dict[str, Any]:
    """Train one (strategy, seed) run and return metrics, real ranks and costs."""
    from lora_fast import allocation
    from lora_fast.injection import inject
    from lora_fast.injection import lora_modules
    from lora_fast.train import train

    params, seed = spec.params, spec.params["seed"]
    strategy, steps = params["strategy"], params["steps"]
    start = time.perf_counter()
    base, tokenizer, train_data, eval_data = _setup(params, ctx, seed)
    targets = allocation.find_targets(base, params["targets"])
    extra: dict[str, Any] = {}
    if strategy == "adalora":
        result, model, ranks = _train_adalora(params, ctx, base, (tokenizer, train_data, eval_data), seed)
        phases = [result]
    else:
        torch.manual_seed(seed)
        saved = ["classifier"] if params["task"] == "classification" else None
        pattern = _fixed_pattern(strategy, targets, params)
        model = inject(base, params["targets"], r=8, alpha=params["alpha"], rank_pattern=pattern,
                       modules_to_save=saved)  # fmt: skip
        phases = []
        if strategy in PROBED:
            probe_eval = eval_data.select(list(range(8))) if params["task"] == "classification" else eval_data[:4]
            probe = train(model, train_data, probe_eval, _train_config(params, ctx, params["probe_steps"], seed),
                          tokenizer)  # fmt: skip
            phases.append(probe)
            t0 = time.perf_counter()
            if strategy == "energy_guided":
                e = params["energy"]
                energy = {rec["name"]: rec["energy_rank"] for rec in probe.adapters}
                pattern = allocation.energy_guided(targets, energy, e["budget_rank"], e["r_min"], e["r_max"])
                extra["probe_energy_ranks"] = energy
            else:
                w = params["warmup"]
                batches = _gradient_batches(params, tokenizer, train_data, next(model.parameters()).device)
                pattern = allocation.warmup_importance(model, batches, w["alpha"], w["beta"], w["r_min"], w["r_max"])
            allocation.resize_adapters(model, pattern)
            extra["scoring_time_s"] = time.perf_counter() - t0
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


def report_runs(rows: list[dict[str, Any]], config: dict[str, Any], outdir: Path, name: str,
                defaults: dict[str, Any]) -> str:  # fmt: skip
    """Tables (``strategies.md``, ``layer_ranks.md``) and plots (``frontier.png``, ``layer_ranks.png``).

    Args:
        rows: finished runs of the study.
        config: the resolved configuration.
        outdir: this study's results folder.
        name: the study's name.
        defaults: its default section.
    """
    sec = section(config, name, defaults)
    outdir.mkdir(parents=True, exist_ok=True)
    if not rows:
        return f"### {name}\n\nno finished runs.\n"
    classification = sec["task"] == "classification"
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
    text = f"# Rank allocation strategies ({sec['scale']})\n\n"
    text += (f"{metric} over seeds: mean [min, max]. Ties: |difference of means| ≤ the larger seed range. "
             "LoRA params = Σ r·(k+n) with the real final ranks (AdaLoRA: unmasked singular values; it trains "
             f"init_r={sec['adalora']['init_r']} everywhere, counted in trainable params).\n\n")  # fmt: skip
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
    layer_text = f"# Mean LoRA rank per layer (over the layer's adapted modules and seeds), {sec['scale']}\n\n"
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

    summary = f"### {name}\n\n{sec['scale']}; {metric} over {n_seeds} seed(s); tables and plots in {outdir}.\n\n"
    summary += markdown_table(
        ["strategy", metric, "verdict", "LoRA params"],
        [[s, f"{stats[s]['mean']:.4f}", stats[s]["verdict"], int(mean_of(s, "lora_params"))] for s in order],
    )
    return summary + "\n" + "\n".join(f"- {s}" for s in sentences) + "\n"


def report(rows: list[dict[str, Any]], config: dict[str, Any], outdir: Path) -> str:
    """Tables and plots of the classification study (see ``report_runs``)."""
    return report_runs(rows, config, outdir, NAME, DEFAULTS)
