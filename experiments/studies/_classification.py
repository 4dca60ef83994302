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
import json
import math
from typing import Any

import torch

from experiments.runner.config import LORA_KEYS
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


def vit_model() -> ModelSettings:
    """The DINOv2 ViT-S/14 of the vision studies, all 12 blocks (a checkpoint tuned further for saliency: see
    ``experiments.models.dinov2``); ``max_length`` is unused (the inputs are pixels)."""
    return ModelSettings(name="dinov2_vits14", num_layers=None, max_length=32)


def vit_lora() -> LoraSettings:
    """LoRA on the ViT's attention projections at r=32 (alpha 64: scaling 2, as the text default)."""
    return LoraSettings(targets=["query", "key", "value"], r=32, alpha=64.0, lr=2e-3, max_steps=80, batch_size=16,
                        eval_every=20, snapshot_every=10)  # fmt: skip


def vit_full() -> TrainSettings:
    """Full fine-tuning of the ViT matching ``vit_lora``'s step budget."""
    return TrainSettings(lr=5e-5, max_steps=80, batch_size=16, eval_every=20)


def clipart_options() -> dict[str, Any]:
    """Clip art at 56 px (4 x 4 patches of 14 px): 3.4x cheaper per step than 112 px on the 2-core CPU."""
    return {"size": 56}


@dataclasses.dataclass(frozen=True)
class ClassificationTask:
    """Settings every classification study shares.

    Args:
        dataset: a corpus of ``experiments.data.DATASETS``.
        dataset_options: keyword arguments of its loader (e.g. ``{size: 112}`` for clip art at 112 px).
        test_fraction: share of each class held out once (seed 0) as the evaluation pool.
        min_per_class: only classes with at least this many examples are eligible.
        train_size: training examples per run, the same for every class count.
        eval_size: evaluation examples per run, balanced over its classes; when a class's held-out pool is smaller
            (clip art: 10 images of a 40-image class), every class contributes as many as the smallest one has, and
            the run records how many it used (``eval_examples``).
        model: the base model.
        lora: ``lora_fast.inject`` settings (targets, r, alpha, dropout) and ``TrainConfig`` fields of LoRA runs.
        full: ``TrainConfig`` fields of full fine-tuning runs.
    """

    dataset: str = "wordnet"
    dataset_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    test_fraction: float = 0.2
    min_per_class: int = 500
    train_size: int = 256
    eval_size: int = 256
    model: ModelSettings = dataclasses.field(default_factory=ModelSettings)
    lora: LoraSettings = dataclasses.field(default_factory=default_lora)
    full: TrainSettings = dataclasses.field(default_factory=default_full)

    def __post_init__(self) -> None:
        from experiments.data import DATASETS
        from experiments.data import dataset_options

        if self.dataset not in DATASETS:
            raise ConfigError(f"dataset: unknown {self.dataset!r}; available: {', '.join(sorted(DATASETS))}")
        known = dataset_options(self.dataset)
        unknown = [k for k in self.dataset_options if k not in known]
        if unknown:
            raise ConfigError(f"dataset_options: {self.dataset} has no option {unknown[0]!r}; its options: "
                              f"{', '.join(known) or 'none'}")  # fmt: skip
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


@dataclasses.dataclass(frozen=True)
class PoolSizes:
    """What a corpus offers a class-count sweep: eligible classes and the smallest train / held-out pool among them.

    Args:
        eligible: classes with at least ``min_per_class`` examples.
        min_train: examples of the smallest eligible class in the training pool.
        min_test: examples of the smallest eligible class in the held-out pool.
    """

    eligible: int
    min_train: int
    min_test: int


@functools.lru_cache(maxsize=8)
def _pool_sizes(dataset: str, options_json: str, test_fraction: float, min_per_class: int) -> PoolSizes:
    from experiments.data import load_dataset
    from experiments.data.sampling import eligible_classes
    from experiments.data.sampling import train_test_split

    data = load_dataset(dataset, **json.loads(options_json))
    eligible = eligible_classes(data, min_per_class)
    train_pool, test_pool = train_test_split(data, test_fraction, 0)
    train_counts, test_counts = train_pool.class_counts(), test_pool.class_counts()
    return PoolSizes(len(eligible), min((int(train_counts[c]) for c in eligible), default=0),
                     min((int(test_counts[c]) for c in eligible), default=0))  # fmt: skip


def pool_sizes(section: ClassificationTask) -> PoolSizes:
    """``PoolSizes`` of a section's corpus (loads the corpus once per process: in the parent of a worker pool, so a
    corpus with a decode-once cache, like clip art, is decoded before the workers start).

    Args:
        section: the study's section.
    """
    options = json.dumps(dict(section.dataset_options), sort_keys=True)
    return _pool_sizes(section.dataset, options, section.test_fraction, section.min_per_class)


def eligible_count(section: ClassificationTask) -> int:
    """Number of classes of a section's corpus with at least ``min_per_class`` examples.

    Args:
        section: the study's section.
    """
    return pool_sizes(section).eligible


def check_train_size(section: ClassificationTask, n: int, where: str) -> None:
    """Raise ``ConfigError`` when ``train_size`` examples cannot be spread over ``n`` classes of the corpus (the
    smallest eligible class's training pool must hold ``ceil(train_size / n)``).

    Args:
        section: the study's section.
        n: classes per run.
        where: study name for the message.
    """
    sizes = pool_sizes(section)
    need = math.ceil(section.train_size / n)
    if need > sizes.min_train:
        raise ConfigError(f"{where}: train_size {section.train_size} over n = {n} classes needs {need} training "
                          f"examples per class, but the smallest eligible class of {section.dataset} has "
                          f"{sizes.min_train} after holding out test_fraction {section.test_fraction}; lower "
                          f"train_size to {sizes.min_train * n} or raise min_per_class")  # fmt: skip


def subsets_for(section: ClassCountSweep, n: int, where: str) -> int:
    """How many distinct class subsets exist and are wanted for ``n`` classes; checks n and the training size
    against the corpus.

    Args:
        section: the sweep.
        n: classes per subset.
        where: study name for the error message.
    """
    t = eligible_count(section)
    if not 2 <= n <= t:
        raise ConfigError(f"{where}: class count {n} outside 2..{t} ({section.dataset} has {t} classes with >= "
                          f"{section.min_per_class} examples)")  # fmt: skip
    check_train_size(section, n, where)
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
        "dataset_options": dict(section.dataset_options),
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


def task_data(params: dict[str, Any], ctx: RunContext) -> tuple[Any, Any]:
    """(training set, evaluation set) of a run: its class subset, ``train_size`` balanced training examples and up
    to ``eval_size`` balanced held-out ones (see ``ClassificationTask.eval_size``), relabelled 0..n-1.

    Args:
        params: from ``run_params``.
        ctx: the process's caches.
    """
    from experiments.data import sampling

    seed = params["seed"]
    train_pool, test_pool = ctx.dataset_split(params["dataset"], params["test_fraction"], 0, params["dataset_options"])
    # classes with >= min_per_class examples in the whole corpus; the pools are a fixed split of it
    counts = train_pool.class_counts() + test_pool.class_counts()
    eligible = [c for c, k in enumerate(counts.tolist()) if k >= params["min_per_class"]]
    classes = sampling.sample_class_subsets(eligible, params["n_classes"], params["subsets"], seed)[params["subset"]]
    train_set = sampling.balanced_subset(train_pool, classes, params["train_size"], seed)
    held_out = min(int(test_pool.class_counts()[c]) for c in classes)
    eval_set = sampling.balanced_subset(test_pool, classes, min(params["eval_size"], held_out * len(classes)), seed)
    return train_set, eval_set


def run_classification(params: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    """Train one classifier as ``params`` says and return its metrics, classes and per-adapter energy ranks.

    Args:
        params: from ``run_params``.
        ctx: shared caches (model, tokenizer, dataset split), device and progress settings.
    """
    import lora_fast
    from experiments.data import sampling
    from experiments.models import resolve_targets
    from lora_fast.train import TrainConfig
    from lora_fast.train import evaluate
    from lora_fast.train import train

    seed = params["seed"]
    # "train_seed" (optional) repeats training on the same task: classes, examples and noise follow "seed"
    train_seed = params.get("train_seed", seed)
    train_set, eval_set = task_data(params, ctx)
    noisy = sampling.add_label_noise(train_set, params["noise"], seed) if params["noise"] else train_set

    m = ModelSettings(**params["model"])
    model, tokenizer = ctx.classifier(m, train_set.num_classes, train_seed)
    settings = dict(params["train"])
    adapter = {k: settings.pop(k) for k in LORA_KEYS if k in settings}
    if params["kind"] == "lora":
        torch.manual_seed(train_seed)  # LoRA's A init draws from the global RNG: same seed, same adapters, any order
        model = lora_fast.inject(model, resolve_targets(model, adapter["targets"]), r=adapter["r"],
                                 alpha=adapter["alpha"], dropout=adapter.get("dropout", 0.0),
                                 use_rslora=adapter.get("use_rslora", False),
                                 modules_to_save=["classifier"])  # fmt: skip
    config = TrainConfig(seed=train_seed, max_length=m.max_length, device=ctx.device, progress=ctx.progress,
                         **settings)  # fmt: skip
    result = train(model, noisy, eval_set, config, tokenizer=tokenizer)
    out = result.as_dict()
    loss = out.pop("train_loss")
    # the full loss curve is kept at 1 point per 4 steps: enough to plot, small in JSON
    out["train_loss"] = loss[::4]
    out["final_train_loss"] = sum(loss[-8:]) / max(1, len(loss[-8:]))
    out["classes"] = list(train_set.class_names)
    out["eval_examples"] = len(eval_set)
    out["noisy_fraction"] = sampling.noisy_fraction(train_set, noisy)
    out["train_accuracy"] = float(evaluate(model, noisy, config, tokenizer)["accuracy"])
    changed = torch.nonzero(noisy.labels != train_set.labels).flatten()
    out["memorised_fraction"] = (
        float(evaluate(model, noisy.select(changed), config, tokenizer)["accuracy"]) if changed.numel() else None
    )
    if params["kind"] == "lora":
        controls = _untrained_controls(model, config.energy_threshold, train_seed)
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
