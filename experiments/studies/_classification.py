"""The classification run the studies share: pick classes, sample fixed-size data, train (LoRA or full), analyse.

``ClassificationTask`` is the typed section every classification study extends (data, model, LoRA and full
fine-tuning settings); ``run_params`` turns it into the parameter dict of one run, and ``run_classification``
executes that dict. Everything that changes the outcome is in the params, so the run id (a hash of them) is stable.

Besides accuracy and the adapters' energy ranks, every run records:

- ``eval_history`` (accuracy every ``eval_every`` steps) and ``snapshots`` (energy ranks every ``snapshot_every``
  steps), from which the reports say how much each still moved over the last quarter of training;
- ``train_accuracy`` on the labels it was trained on (noisy ones included) and ``memorised_fraction``, the share of
  examples whose label was changed by the noise that the model predicts with the changed label;
- per adapter, ``b_std`` and ``control_energy_rank``: the energy rank of an *untrained* adapter of the same shape,
  A drawn as LoRA initialises it and B random at the trained B's scale (the reference a trained adapter's energy
  rank is compared against; energy rank is scale-free, so it is the shape of a random spectrum).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import torch

from experiments.runner.config import ConfigError
from experiments.runner.config import LoraSettings
from experiments.runner.config import ModelSettings
from experiments.runner.config import SweepConfig
from experiments.runner.config import TrainSettings
from experiments.runner.context import RunContext
from experiments.runner.spec import RunSpec


def default_lora() -> LoraSettings:
    """LoRA on the attention projections at r=32 (alpha 64: scaling 2), for the defaults of every study."""
    return LoraSettings(targets=["query", "key", "value"], r=32, alpha=64.0, lr=4e-3, max_steps=96, batch_size=16,
                        eval_every=24, snapshot_every=12)  # fmt: skip


def default_full() -> TrainSettings:
    """Full fine-tuning settings matching ``default_lora``'s step budget."""
    return TrainSettings(lr=2e-4, max_steps=96, batch_size=16, eval_every=24)


@dataclasses.dataclass(frozen=True)
class ClassificationTask:
    """Settings every classification study shares.

    Args:
        dataset: a corpus of ``experiments.data.DATASETS``.
        test_fraction: share of each class held out once (seed 0) as the evaluation pool.
        min_per_class: only classes with at least this many examples are eligible.
        train_size: training examples per run, the same for every class count.
        eval_size: evaluation examples per run (balanced over its classes).
        model: the base model.
        lora: ``lora_fast.inject`` settings (targets, r, alpha, dropout) and ``TrainConfig`` fields of LoRA runs.
        full: ``TrainConfig`` fields of full fine-tuning runs.
    """

    dataset: str = "wordnet"
    test_fraction: float = 0.2
    min_per_class: int = 500
    train_size: int = 256
    eval_size: int = 256
    model: ModelSettings = dataclasses.field(default_factory=ModelSettings)
    lora: LoraSettings = dataclasses.field(default_factory=default_lora)
    full: TrainSettings = dataclasses.field(default_factory=default_full)

    def __post_init__(self) -> None:
        from experiments.data import DATASETS

        if self.dataset not in DATASETS:
            raise ConfigError(f"dataset: unknown {self.dataset!r}; available: {', '.join(sorted(DATASETS))}")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        for key in ("min_per_class", "train_size", "eval_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")


@dataclasses.dataclass(frozen=True)
class ClassCountSweep(ClassificationTask):
    """A ``ClassificationTask`` over class counts: ``subsets_per_count`` random class subsets for each n.

    Args:
        class_counts: numbers of classes n (each 2..t, t the eligible classes).
        subsets_per_count: random n-class subsets per n (fewer when fewer exist, e.g. one for n = t).
    """

    class_counts: tuple[int, ...] = (2, 4, 8, 16, 32)
    subsets_per_count: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.class_counts or any(n < 2 for n in self.class_counts):
            raise ConfigError(f"class_counts must be a non-empty list of counts >= 2, got {list(self.class_counts)}")
        if self.subsets_per_count < 1:
            raise ConfigError(f"subsets_per_count must be >= 1, got {self.subsets_per_count}")


@functools.lru_cache(maxsize=8)
def eligible_count(dataset: str, min_per_class: int) -> int:
    """Number of classes of ``dataset`` with at least ``min_per_class`` examples (loads the corpus once).

    Args:
        dataset: corpus name in ``experiments.data``.
        min_per_class: threshold.
    """
    from experiments.data import load_dataset
    from experiments.data.sampling import eligible_classes

    return len(eligible_classes(load_dataset(dataset), min_per_class))


def subsets_for(section: ClassCountSweep, n: int, where: str) -> int:
    """How many distinct class subsets exist and are wanted for ``n`` classes; checks n against the corpus.

    Args:
        section: the sweep.
        n: classes per subset.
        where: study name for the error message.
    """
    t = eligible_count(section.dataset, section.min_per_class)
    if not 2 <= n <= t:
        raise ConfigError(f"{where}: class count {n} outside 2..{t} ({section.dataset} has {t} classes with >= "
                          f"{section.min_per_class} examples)")  # fmt: skip
    return min(section.subsets_per_count, math.comb(t, n))


def run_params(
    section: ClassificationTask, kind: str, n_classes: int, subset: int, subsets: int, noise: float, seed: int
) -> dict[str, Any]:
    """Parameters of one run.

    Args:
        section: the study's section.
        kind: ``"lora"`` or ``"full"``.
        n_classes: classes in the task.
        subset: index of the class subset among the ``subsets`` drawn for ``n_classes``.
        subsets: how many subsets are drawn for ``n_classes`` (the draw of subset i depends on it).
        noise: label-noise fraction p (1.0: every label shuffled).
        seed: seed of class sampling, data sampling, head init and training.
    """
    return {
        "kind": kind,
        "dataset": section.dataset,
        "test_fraction": section.test_fraction,
        "min_per_class": section.min_per_class,
        "n_classes": n_classes,
        "subset": subset,
        "subsets": subsets,
        "train_size": section.train_size,
        "eval_size": section.eval_size,
        "noise": noise,
        "seed": seed,
        "model": dataclasses.asdict(section.model),
        "train": dict(section.lora if kind == "lora" else section.full),
    }


def _untrained_controls(model: torch.nn.Module, threshold: float, seed: int) -> dict[str, dict[str, float]]:
    """Per adapter: the trained B's std and the energy rank of an untrained adapter of the same shape (A as LoRA
    initialises it, B ~ N(0, std of the trained B))."""
    from lora_fast.energy_rank import energy_rank
    from lora_fast.energy_rank import singular_values
    from lora_fast.injection import lora_modules

    gen = torch.Generator().manual_seed(seed + 7919)  # a stream of its own: the training seed's draws stay as they are
    names, factors_a, factors_b, scales, stds = [], [], [], [], []
    for name, layer in lora_modules(model).items():
        b_std = float(layer.lora_B.detach().float().std())
        bound = 1 / math.sqrt(layer.in_features)  # kaiming_uniform_(a=√5) on an (r, k) matrix: U(−1/√k, 1/√k)
        factors_a.append((torch.rand(layer.r, layer.in_features, generator=gen) * 2 - 1) * bound)
        factors_b.append(torch.randn(layer.out_features, layer.r, generator=gen) * b_std)
        names.append(name)
        scales.append(layer.scaling)
        stds.append(b_std)
    ranks = energy_rank(singular_values(factors_a, factors_b, scales), threshold)
    return {n: {"b_std": s, "control_energy_rank": int(k)} for n, s, k in zip(names, stds, ranks, strict=True)}


def run_classification(params: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    """Train one classifier as ``params`` says and return its metrics, classes and per-adapter energy ranks.

    Args:
        params: from ``run_params``.
        ctx: shared caches (model, tokenizer, dataset split), device and progress settings.
    """
    import lora_fast
    from experiments.data import sampling
    from lora_fast.train import TrainConfig
    from lora_fast.train import evaluate
    from lora_fast.train import train

    seed = params["seed"]
    train_pool, test_pool = ctx.dataset_split(params["dataset"], params["test_fraction"], 0)
    # classes with >= min_per_class examples in the whole corpus; the pools are a fixed split of it
    counts = train_pool.class_counts() + test_pool.class_counts()
    eligible = [c for c, k in enumerate(counts.tolist()) if k >= params["min_per_class"]]
    classes = sampling.sample_class_subsets(eligible, params["n_classes"], params["subsets"], seed)[params["subset"]]
    train_set = sampling.balanced_subset(train_pool, classes, params["train_size"], seed)
    eval_set = sampling.balanced_subset(test_pool, classes, params["eval_size"], seed)
    noisy = sampling.add_label_noise(train_set, params["noise"], seed) if params["noise"] else train_set

    m = ModelSettings(**params["model"])
    model, tokenizer = ctx.classifier(m, len(classes), seed)
    settings = dict(params["train"])
    adapter = {k: settings.pop(k) for k in ("targets", "r", "alpha", "dropout") if k in settings}
    if params["kind"] == "lora":
        torch.manual_seed(seed)  # LoRA's A init draws from the global RNG: same seed, same adapters, any run order
        model = lora_fast.inject(model, adapter["targets"], r=adapter["r"], alpha=adapter["alpha"],
                                 dropout=adapter.get("dropout", 0.0), modules_to_save=["classifier"])  # fmt: skip
    config = TrainConfig(seed=seed, max_length=m.max_length, device=ctx.device, progress=ctx.progress, **settings)
    result = train(model, noisy, eval_set, config, tokenizer=tokenizer)
    out = result.as_dict()
    loss = out.pop("train_loss")
    # the full loss curve is kept at 1 point per 4 steps: enough to plot, small in JSON
    out["train_loss"] = loss[::4]
    out["final_train_loss"] = sum(loss[-8:]) / max(1, len(loss[-8:]))
    out["classes"] = [train_set.class_names[i] for i in range(len(classes))]
    out["noisy_fraction"] = sampling.noisy_fraction(train_set, noisy)
    out["train_accuracy"] = float(evaluate(model, noisy, config, tokenizer)["accuracy"])
    changed = torch.nonzero(noisy.labels != train_set.labels).flatten()
    out["memorised_fraction"] = (
        float(evaluate(model, noisy.select(changed), config, tokenizer)["accuracy"]) if changed.numel() else None
    )
    if params["kind"] == "lora":
        controls = _untrained_controls(model, config.energy_threshold, seed)
        for record in out["adapters"]:
            record.update(controls.get(record["name"], {}))
    return out


def sweep_specs(config: SweepConfig, source: str, kinds: tuple[str, ...], shuffled: bool) -> list[RunSpec]:
    """The runs of the class-count sweep configured in section ``source``: ``kinds`` runs per (n, subset), and the
    shuffled-label LoRA controls when ``shuffled`` and the section asks for them (``shuffled_control_subsets``).

    Every study that plans these runs gets the same ids and the same executing study (``source``), so they train once.

    Args:
        config: the resolved configuration.
        source: the section holding the sweep.
        kinds: ``"full"`` and/or ``"lora"``.
        shuffled: include the shuffled-label controls.
    """
    section = config.section(source)
    if not isinstance(section, ClassCountSweep):
        raise ConfigError(f"{source} is not a class-count sweep")
    specs = []
    for n in section.class_counts:
        subsets = subsets_for(section, n, source)
        for subset in range(subsets):
            for kind in kinds:
                params = run_params(section, kind, n, subset, subsets, 0.0, config.seed)
                specs.append(RunSpec.make(source, f"{kind}-n{n:02d}-s{subset}", params))
        controls = min(getattr(section, "shuffled_control_subsets", 0), subsets) if shuffled else 0
        for subset in range(controls):
            params = run_params(section, "lora", n, subset, subsets, 1.0, config.seed)
            specs.append(RunSpec.make(source, f"shuffled-n{n:02d}-s{subset}", params))
    return specs
