"""The classification run shared by the studies: pick classes, sample fixed-size data, train (LoRA or full), analyse.

``classification_params`` builds the parameter dict of one run from a study's config section; ``run_classification``
executes it. Everything that changes the outcome is in the params, so the run id (a hash of them) is stable.
"""

from __future__ import annotations

from typing import Any

import torch

from experiments.runner.context import RunContext


def classification_params(
    config: dict[str, Any], section: dict[str, Any], kind: str, n_classes: int, subset: int, noise: float, seed: int
) -> dict[str, Any]:
    """Parameters of one run.

    Args:
        config: the resolved configuration (``model`` is read from it).
        section: the study's section (dataset, sizes, ``lora``/``full`` hyper-parameters).
        kind: ``"lora"`` or ``"full"``.
        n_classes: classes in the task.
        subset: index of the class subset among ``subsets`` drawn for ``n_classes``.
        noise: label-noise fraction p.
        seed: seed of class sampling, data sampling, head init and training.
    """
    return {
        "kind": kind,
        "dataset": section["dataset"],
        "test_fraction": section["test_fraction"],
        "min_per_class": section["min_per_class"],
        "n_classes": n_classes,
        "subset": subset,
        "subsets": section.get("subsets_per_count", 1),
        "train_size": section["train_size"],
        "eval_size": section["eval_size"],
        "noise": noise,
        "seed": seed,
        "model": dict(config["model"]),
        "train": dict(section[kind]),
        "energy_threshold": section.get("energy_threshold", 0.95),
        "snapshot_every": section.get("snapshot_every", 0) if kind == "lora" else 0,
    }


def run_classification(params: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    """Train one classifier as ``params`` says and return its metrics, classes and per-adapter energy ranks.

    Args:
        params: from ``classification_params``.
        ctx: shared caches (model, tokenizer, dataset split), device and progress settings.
    """
    import lora_fast
    from lora_fast import data
    from lora_fast.train import TrainConfig
    from lora_fast.train import train

    seed = params["seed"]
    train_pool, test_pool = ctx.dataset_split(params["dataset"], params["test_fraction"], 0)
    # classes with >= min_per_class examples in the whole corpus; the pools are a fixed split of it
    counts = train_pool.class_counts() + test_pool.class_counts()
    eligible = [c for c, k in enumerate(counts.tolist()) if k >= params["min_per_class"]]
    subsets = data.sample_class_subsets(eligible, params["n_classes"], params["subsets"], seed)
    classes = subsets[params["subset"]]
    train_set = data.balanced_subset(train_pool, classes, params["train_size"], seed)
    eval_set = data.balanced_subset(test_pool, classes, params["eval_size"], seed)
    noisy = data.add_label_noise(train_set, params["noise"], seed) if params["noise"] else train_set

    m = params["model"]
    model = ctx.text_classifier(m["name"], m.get("num_layers"), len(classes), seed)
    hp = dict(params["train"])
    if params["kind"] == "lora":
        torch.manual_seed(seed)  # LoRA's A init draws from the global RNG: same seed, same adapters, any run order
        model = lora_fast.inject(
            model, hp.pop("targets"), r=hp.pop("r"), alpha=hp.pop("alpha"), modules_to_save=["classifier"]
        )
    config = TrainConfig(
        seed=seed,
        max_length=m["max_length"],
        device=ctx.device,
        progress=ctx.progress,
        snapshot_every=params["snapshot_every"],
        energy_threshold=params["energy_threshold"],
        **hp,
    )
    result = train(model, noisy, eval_set, config, tokenizer=ctx.tokenizer(m["name"]))
    out = result.as_dict()
    loss = out.pop("train_loss")
    # the full loss curve is kept at 1 point per 4 steps: enough to plot, small in JSON
    out["train_loss"] = loss[::4]
    out["final_train_loss"] = sum(loss[-8:]) / max(1, len(loss[-8:]))
    out["classes"] = [train_set.class_names[i] for i in range(len(classes))]
    out["noisy_fraction"] = data.noisy_fraction(train_set, noisy)
    return out


def mean_rank_by_kind(row: dict[str, Any]) -> dict[str, float]:
    """Mean energy rank over layers for each matrix kind of a run (``{"query": 3.5, ...}``).

    Args:
        row: a finished LoRA run.
    """
    by_kind: dict[str, list[int]] = {}
    for a in row.get("adapters", []):
        by_kind.setdefault(a["kind"], []).append(a["energy_rank"])
    return {k: sum(v) / len(v) for k, v in by_kind.items()}
