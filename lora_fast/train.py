"""A compact training loop for LoRA and full fine-tuning, with eval, NaN detection, cost accounting and snapshots.

``train(model, train_data, eval_data, config, tokenizer=...)`` trains every parameter with ``requires_grad`` (so
the same call does LoRA after ``lora_fast.inject`` and full fine-tuning on an untouched model) with AdamW (fused
kernel), linear warm-up then linear decay, and gradient clipping, and returns a ``TrainResult``. Text batches group
examples of similar length (``length_buckets``) so they carry little padding.

Task types (``TrainConfig.task``; ``"auto"`` picks ``"causal_lm"`` for a model class named ``*ForCausalLM`` and
``"classification"`` otherwise):

- ``"classification"``: data are ``lora_fast.data.ClassificationData``. Text is tokenized once (padded per batch to
  its longest sequence, truncated at ``max_length``) and fed as ``model(input_ids=, attention_mask=)``; tensor
  inputs are fed as ``model(x)``. The model returns logits (B, C) or an object with ``.logits``. Reports
  accuracy, macro-F1 and mean cross-entropy.
- ``"causal_lm"``: data are a sequence of strings (or ``ClassificationData`` whose texts are used, labels
  ignored). Loss is next-token cross-entropy over non-pad tokens; reports ``eval_loss``, ``perplexity`` =
  exp(eval_loss) and next-token ``accuracy``; ``macro_f1`` is None.

Every step checks the loss and the gradient norm; the first non-finite value raises ``NonFiniteLossError`` naming
the step (or, with ``raise_on_nonfinite=False``, stops and returns ``finite=False``). ``snapshot_every=N`` records
the energy rank of every adapter each N steps with one batched ``lora_fast.energy_rank.analyze`` call; the time it
takes is reported as ``snapshot_time_s`` so its overhead is visible next to ``wall_time_s``. Measured on a 2-core
CPU: one snapshot of the 18 rank-8 adapters of a 6-layer MiniLM (query/key/value) costs 5.3 ms of CPU, against
~250 ms for a LoRA training step at batch 16 (one thread), so every 16 steps adds ~0.1% and every step ~2%.
A causal LM's tokenizer without a pad token gets ``pad_token = eos_token``.

Precision (``TrainConfig.precision``): ``"auto"`` trains under bf16 autocast on CUDA and on CPUs with native bf16
(AVX512-BF16 or AMX), in fp32 elsewhere; ``"fp16"`` adds dynamic loss scaling (``torch.amp.GradScaler``). Trainable
parameters stay fp32 (master weights); evaluation runs under the same autocast; ``TrainResult.precision`` records
what was used.

Several processes (``torchrun``): ``train`` sees ``WORLD_SIZE`` > 1, joins (or creates) the process group (gloo on
CPU, nccl on CUDA, one GPU per ``LOCAL_RANK``) and wraps the model in ``DistributedDataParallel``, which all-reduces
the gradients of the trainable parameters. ``batch_size`` stays the global batch: every rank draws the same batch
order and takes its own ``batch_size / world_size`` examples of each batch; evaluation is sharded the same way and
its sums are all-reduced, as is the training loss, so every rank returns the same metrics. Rank 0 alone shows
progress and takes energy-rank snapshots (broadcast to the others); write files only where ``is_main_process()``.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` over the call (``peak_memory_kind="cuda_allocated"``);
on CPU, the process's resident set size read from ``/proc/self/statm`` after every forward pass, where
activations peak (``"cpu_rss"``: includes the model and Python itself, so compare runs, not absolute numbers).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lora_fast.data import ClassificationData

__all__ = [
    "PRECISIONS",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "is_main_process",
    "native_bf16",
    "resolve_precision",
    "seed_everything",
    "train",
]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_AUTOCAST_DTYPE = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_TASKS = ("auto", "classification", "causal_lm")
_IGNORE_INDEX = -100  # cross_entropy's ignore_index, Hugging Face's "no label" convention


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/Inf at ``step`` (1-based optimizer step)."""

    def __init__(self, step: int, what: str, value: float) -> None:
        self.step = step
        self.what = what
        self.value = value
        super().__init__(f"non-finite {what} ({value}) at step {step}; lower the learning rate or check the data")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class TrainConfig:
    """Hyper-parameters of ``train``; impossible values raise ``ValueError`` naming the field.

    Args:
        epochs: passes over the training data (fractions allowed, > 0); ignored when ``max_steps`` is set.
        max_steps: exact number of optimizer steps (>= 1).
        lr: peak learning rate of AdamW (>= 0).
        batch_size: training batch size (>= 1), the global batch when several processes train together.
        eval_batch_size: evaluation batch size (>= 1).
        weight_decay: AdamW weight decay (>= 0), applied to matrices only (not biases or norms).
        warmup_ratio: share of the steps with a linear warm-up, in [0, 1]; the rest decays linearly to 0.
        max_grad_norm: clip the global gradient norm to this (> 0); None turns clipping off.
        seed: seeds Python, NumPy and torch, and the shuffling order.
        eval_every: evaluate every N steps as well as at the end (0 = only at the end).
        snapshot_every: record energy ranks of all adapters every N steps (0 = off).
        energy_threshold: the energy share, in (0, 1], for snapshots and the final ``adapters``.
        max_length: token truncation length for text (>= 1; >= 2 for a causal LM, which predicts the next token).
        length_buckets: group texts of similar length within windows of this many batches (1 = off); on WordNet
            glosses at batch 16 this pads to 18 tokens on average instead of 31.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        progress: show a tqdm progress bar.
        task: ``"auto"``, ``"classification"`` or ``"causal_lm"`` (see the module docstring).
        raise_on_nonfinite: raise ``NonFiniteLossError``; if False, stop and return ``finite=False``.
        precision: ``"auto"``, ``"fp32"``, ``"bf16"`` or ``"fp16"`` (see the module docstring).
    """

    epochs: float = 1.0
    max_steps: int | None = None
    lr: float = 5e-4
    batch_size: int = 16
    eval_batch_size: int = 64
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    max_grad_norm: float | None = 1.0
    seed: int = 0
    eval_every: int = 0
    snapshot_every: int = 0
    energy_threshold: float = 0.95
    max_length: int = 64
    length_buckets: int = 8
    device: str = "auto"
    progress: bool = True
    task: str = "auto"
    raise_on_nonfinite: bool = True
    precision: str = "auto"

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"TrainConfig.{name} must be {rule}, got {getattr(self, name)!r}")

        if not (_is_number(self.epochs) and self.epochs > 0):
            raise bad("epochs", "a number > 0")
        if self.max_steps is not None and not (_is_int(self.max_steps) and self.max_steps >= 1):
            raise bad("max_steps", "None or an int >= 1")
        for name in ("batch_size", "eval_batch_size", "max_length", "length_buckets"):
            if not (_is_int(getattr(self, name)) and getattr(self, name) >= 1):
                raise bad(name, "an int >= 1")
        for name in ("eval_every", "snapshot_every"):
            if not (_is_int(getattr(self, name)) and getattr(self, name) >= 0):
                raise bad(name, "an int >= 0 (0 = off)")
        for name in ("lr", "weight_decay"):
            if not (_is_number(getattr(self, name)) and getattr(self, name) >= 0):
                raise bad(name, "a finite number >= 0")
        if not (_is_number(self.warmup_ratio) and 0 <= self.warmup_ratio <= 1):
            raise bad("warmup_ratio", "in [0, 1]")
        if self.max_grad_norm is not None and not (_is_number(self.max_grad_norm) and self.max_grad_norm > 0):
            raise bad("max_grad_norm", "None (no clipping) or a finite number > 0")
        if not (_is_number(self.energy_threshold) and 0 < self.energy_threshold <= 1):
            raise bad("energy_threshold", "in (0, 1]")
        if not _is_int(self.seed):
            raise bad("seed", "an int")
        if self.task not in _TASKS:
            raise bad("task", f"one of {', '.join(map(repr, _TASKS))}")
        if self.precision not in PRECISIONS:
            raise bad("precision", f"one of {', '.join(map(repr, PRECISIONS))}")
        if self.task == "causal_lm" and self.max_length < 2:
            raise bad("max_length", ">= 2 for a causal LM (one token predicts the next)")
        if not isinstance(self.device, str):
            raise bad("device", "a string such as 'auto', 'cpu' or 'cuda:0'")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError as exc:
                raise bad("device", "'auto' or a torch device string") from exc


@dataclass
class TrainResult:
    """What ``train`` measured; ``adapters`` holds ``AdapterRecord.as_dict()`` of every adapter.

    Times are seconds of the training loop (final evaluation excluded): ``wall_time_s`` on the clock,
    ``cpu_time_s`` summed over this process's threads (on a shared machine, wall time inflates and CPU time less).

    ``eval_split`` is ``"eval"``, or ``"train"`` when ``train`` got no evaluation data and measured the metrics on
    the training data. ``precision`` is the resolved precision (never ``"auto"``), ``world_size`` the number of
    processes that trained together.

    ``snapshots`` is a list of ``{"step": int, "energy_ranks": {adapter name: int}}``.
    """

    task: str
    accuracy: float
    macro_f1: float | None
    eval_loss: float
    perplexity: float | None
    train_loss: list[float]
    eval_history: list[dict[str, float]]
    wall_time_s: float
    cpu_time_s: float
    snapshot_time_s: float
    peak_memory_bytes: int
    peak_memory_kind: str
    trainable_params: int
    total_params: int
    steps: int
    finite: bool
    precision: str = "fp32"
    eval_split: str = "eval"
    world_size: int = 1
    snapshots: list[dict[str, Any]] = field(default_factory=list)
    adapters: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able copy."""
        return asdict(self)


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy (if installed) and torch (CPU and CUDA).

    Args:
        seed: the seed.
    """
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bf16 natively: a CUDA GPU with bf16 support, a CPU with AVX512-BF16 or AMX.

    Args:
        device: the training device.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # private probes of torch.cpu (present in recent torch); a torch without them counts as "no"
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
    return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``precision`` with ``"auto"`` replaced: bf16 where ``native_bf16(device)``, fp32 elsewhere.

    Args:
        precision: one of ``PRECISIONS``.
        device: the training device.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    dtype = _AUTOCAST_DTYPE[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def is_main_process() -> bool:
    """True outside ``torchrun`` and on its rank 0: where files should be written and progress shown."""
    return _world()[0] == 0


def _world() -> tuple[int, int]:
    """(rank, world size) of the running process group, or of ``torchrun``'s environment before it exists."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _resolve_device(device: str) -> torch.device:
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", local_rank if _world()[1] > 1 else torch.cuda.current_device())
    return resolved


def _join_process_group(device: torch.device) -> bool:
    """Initialise torch.distributed from torchrun's environment unless already done; True if this call did it."""
    if dist.is_initialized():
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch was built without torch.distributed")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def _resolve_task(model: nn.Module, task: str) -> str:
    if task == "auto":
        return "causal_lm" if type(model).__name__.endswith("ForCausalLM") else "classification"
    if task not in ("classification", "causal_lm"):
        raise ValueError(f"task must be 'auto', 'classification' or 'causal_lm', got {task!r}")
    return task


def _labelled(data: ClassificationData, what: str) -> ClassificationData:
    """``data`` without its ignored examples (label -100), after checking every other label is a class index."""
    labels = data.labels
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"{what}: labels must be integers, got {labels.dtype}")
    bad = (labels != _IGNORE_INDEX) & ((labels < 0) | (labels >= data.num_classes))
    if bad.any():
        raise ValueError(
            f"{what}: label {int(labels[bad][0])} is outside 0..{data.num_classes - 1} ({data.num_classes} classes; "
            f"{_IGNORE_INDEX} marks an example to ignore)"
        )
    ignored = labels == _IGNORE_INDEX
    if ignored.all():
        raise ValueError(f"{what}: every label is {_IGNORE_INDEX} (ignored); nothing to train or measure on")
    return data.select(torch.nonzero(~ignored).flatten()) if ignored.any() else data


class _Batches:
    """Encoded examples held as tensors; ``batch(idx)`` trims padding to the longest sequence in the batch."""

    def __init__(
        self, data: ClassificationData | Sequence[str], task: str, tokenizer: Any, max_length: int, what: str
    ) -> None:
        if task == "classification" and not isinstance(data, ClassificationData):
            kind = "a sequence of strings" if isinstance(data, (list, tuple)) else type(data).__name__
            raise ValueError(
                f"{what}: classification needs lora_fast.data.ClassificationData (texts or inputs with labels), "
                f"got {kind} without labels; pass task='causal_lm' to train a language model on plain text"
            )
        if task == "causal_lm" and not isinstance(data, ClassificationData):
            if isinstance(data, str) or not all(isinstance(t, str) for t in data):
                raise ValueError(f"{what}: causal_lm needs a sequence of strings (or ClassificationData with texts)")
        if len(data) == 0:
            raise ValueError(f"{what} is empty")
        is_cls = isinstance(data, ClassificationData) and task == "classification"
        if is_cls:
            data = _labelled(data, what)
        texts = data.texts if isinstance(data, ClassificationData) else tuple(data)
        self.labels = data.labels if is_cls else None
        self.num_classes = data.num_classes if is_cls else None
        self.inputs: torch.Tensor | None = None
        self.ids: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        if texts is None:
            if task != "classification":
                raise ValueError(f"{what}: causal_lm needs text data")
            self.inputs = data.inputs
            return
        if tokenizer is None:
            raise ValueError(f"{what}: text data needs a tokenizer")
        # right padding, whatever the tokenizer's default: batches are trimmed from the right, and a left-padded
        # BERT would put pads where its classifier reads ([CLS] at position 0) and shift every position
        side = getattr(tokenizer, "padding_side", "right")
        tokenizer.padding_side = "right"
        try:
            enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding="longest", return_tensors="pt")
        finally:
            tokenizer.padding_side = side
        self.ids, self.mask = enc["input_ids"], enc["attention_mask"]

    def __len__(self) -> int:
        return (self.inputs if self.inputs is not None else self.ids).shape[0]

    def batch(self, idx: torch.Tensor, device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        labels = self.labels[idx].to(device) if self.labels is not None else None
        if self.inputs is not None:
            return {"x": self.inputs[idx].to(device)}, labels
        mask = self.mask[idx]
        width = int(mask.sum(1).max())
        return {"input_ids": self.ids[idx, :width].to(device), "attention_mask": mask[:, :width].to(device)}, labels


def _forward(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(inputs["x"]) if "x" in inputs else model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def _loss_and_counts(
    task: str, logits: torch.Tensor, inputs: dict[str, torch.Tensor], labels: torch.Tensor | None, classes: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean loss, predictions and targets (flattened over valid tokens for causal LM)."""
    if task == "classification":
        if logits.dim() != 2 or (classes is not None and logits.shape[-1] < classes):
            raise ValueError(
                f"the model returns logits of shape {tuple(logits.shape)} but the data have {classes} classes; "
                "expected (batch, classes) with one column per class"
            )
        return F.cross_entropy(logits.float(), labels), logits.argmax(-1), labels
    keep = inputs["attention_mask"][:, 1:].bool()
    pred_logits = logits[:, :-1][keep].float()
    target = inputs["input_ids"][:, 1:][keep]
    return F.cross_entropy(pred_logits, target), pred_logits.argmax(-1), target


def _macro_f1(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Mean F1 over the classes that occur in target or prediction."""
    return _macro_f1_of(_confusion(pred, target, num_classes))


def _confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes).view(num_classes, -1)


def _macro_f1_of(conf: torch.Tensor) -> float:
    tp = conf.diag().double()
    support = conf.sum(1).double() + conf.sum(0).double()
    present = support > 0
    return float((2 * tp[present] / support[present]).mean()) if present.any() else 0.0


def _all_reduce_sum(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` summed over every process (a no-op in a single process)."""
    if _world()[1] == 1 or not dist.is_initialized():
        return t
    t = t.to(device)
    dist.all_reduce(t)
    return t.cpu()


def _shard(idx: torch.Tensor) -> torch.Tensor:
    """This process's contiguous share of a batch of indices (all of it in a single process)."""
    rank, world = _world()
    return idx.tensor_split(world)[rank] if world > 1 else idx


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: ClassificationData | Sequence[str],
    config: TrainConfig | None = None,
    tokenizer: Any = None,
) -> dict[str, float | None]:
    """Accuracy, macro-F1 (classification), mean loss and perplexity (causal LM) of ``model`` on ``data``.

    Under torchrun each process evaluates its share of ``data`` and the sums are all-reduced.

    Args:
        model: the model, already on its device.
        data: evaluation examples; classification examples labelled -100 are skipped.
        config: supplies ``eval_batch_size``, ``max_length``, ``task`` and ``precision``.
        tokenizer: needed for text.
    """
    config = config or TrainConfig()
    task = _resolve_task(model, config.task)
    device = next(model.parameters()).device
    precision = resolve_precision(config.precision, device)
    batches = data if isinstance(data, _Batches) else _Batches(data, task, tokenizer, config.max_length, "eval data")
    was_training = model.training
    model.eval()
    num_classes = batches.num_classes or 0
    loss_sum, count = torch.zeros((), dtype=torch.float64), 0
    preds: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    # batching texts of similar length trims padding: 512 WordNet glosses (median 16, p90 32 tokens) take 2.9 s of CPU
    # instead of 5.0 s through the 6-layer MiniLM
    order = torch.argsort(batches.mask.sum(1)) if batches.mask is not None else torch.arange(len(batches))
    for start in range(0, len(batches), config.eval_batch_size):
        idx = _shard(order[start : start + config.eval_batch_size])
        if len(idx) == 0:
            continue
        inputs, labels = batches.batch(idx, device)
        with _autocast(device, precision):
            logits = _forward(model, inputs)
        loss, pred, target = _loss_and_counts(task, logits, inputs, labels, batches.num_classes)
        loss_sum += float(loss) * target.numel()
        count += target.numel()
        preds.append(pred.cpu())
        targets.append(target.cpu())
    model.train(was_training)
    pred = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
    target = torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long)
    if task == "classification":
        num_classes = max(num_classes, int(pred.max()) + 1 if len(pred) else 0)
    sums = _all_reduce_sum(torch.stack([loss_sum, torch.tensor(count, dtype=torch.float64)]), device)
    eval_loss = float(sums[0] / max(sums[1], 1))
    result: dict[str, float | None] = {"accuracy": 0.0, "eval_loss": eval_loss, "macro_f1": None, "perplexity": None}
    if task == "classification":
        # the largest class index seen anywhere sizes the confusion matrix identically on every process
        num_classes = int(_all_reduce_max(num_classes, device))
        conf = _all_reduce_sum(_confusion(pred, target, num_classes), device)
        result["accuracy"] = float(conf.diag().sum() / conf.sum().clamp(min=1))
        result["macro_f1"] = _macro_f1_of(conf)
    else:
        correct = _all_reduce_sum(torch.tensor((pred == target).sum().item(), dtype=torch.float64), device)
        result["accuracy"] = float(correct / max(sums[1], 1))
        result["perplexity"] = math.exp(min(eval_loss, 700.0))
    return result


def _all_reduce_max(value: int, device: torch.device) -> int:
    if _world()[1] == 1 or not dist.is_initialized():
        return value
    t = torch.tensor(value, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _epoch_batches(
    n: int, batch_size: int, lengths: torch.Tensor | None, buckets: int, gen: torch.Generator
) -> list[torch.Tensor]:
    """One epoch of shuffled full batches (a last partial batch is dropped when there is more than one batch).

    With ``lengths``, each run of ``buckets`` consecutive batches of the shuffled order is re-split by length, so a
    batch holds texts of similar length and pads less; batch order is then shuffled again.
    """
    order = torch.randperm(n, generator=gen)
    if lengths is not None:
        span = batch_size * buckets
        chunks = [order[i : i + span] for i in range(0, n, span)]
        order = torch.cat([c[torch.argsort(lengths[c], stable=True)] for c in chunks])
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def _adapter_records(model: nn.Module, threshold: float) -> list[Any]:
    """Energy ranks of every adapter (lora_fast or PEFT); empty for a model without adapters (full fine-tuning)."""
    from lora_fast import energy_rank

    if not any(hasattr(m, "lora_A") for m in model.modules()):
        return []
    return energy_rank.analyze(model, threshold=threshold)


def _from_rank0(make: Any) -> Any:
    """``make()`` computed on rank 0 and broadcast to every process (just ``make()`` in a single process)."""
    if _world()[1] == 1 or not dist.is_initialized():
        return make()
    box = [make() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def train(
    model: nn.Module,
    train_data: ClassificationData | Sequence[str],
    eval_data: ClassificationData | Sequence[str] | None,
    config: TrainConfig | None = None,
    tokenizer: Any = None,
) -> TrainResult:
    """Train ``model``'s trainable parameters on ``train_data``, evaluate on ``eval_data``, measure cost.

    Runs unchanged under ``torchrun`` (see the module docstring): pass the same arguments on every rank.

    Args:
        model: a classifier or causal LM; only parameters with ``requires_grad`` are trained.
        train_data: training examples (see the module docstring for the accepted forms); must not be empty.
        eval_data: evaluation examples; None measures the metrics on ``train_data`` (``eval_split="train"``).
        config: hyper-parameters; defaults to ``TrainConfig()``.
        tokenizer: a Hugging Face tokenizer, needed for text.
    """
    config = config or TrainConfig()
    task = _resolve_task(model, config.task)
    rank, world = _world()
    device = _resolve_device(config.device)
    own_group = _join_process_group(device) if world > 1 else False
    try:
        return _train(model, train_data, eval_data, config, tokenizer, task, device, rank, world)
    finally:
        if own_group:
            dist.destroy_process_group()


def _train(
    model: nn.Module,
    train_data: ClassificationData | Sequence[str],
    eval_data: ClassificationData | Sequence[str] | None,
    config: TrainConfig,
    tokenizer: Any,
    task: str,
    device: torch.device,
    rank: int,
    world: int,
) -> TrainResult:
    precision = resolve_precision(config.precision, device)
    if config.batch_size % world:
        raise ValueError(f"TrainConfig.batch_size={config.batch_size} must be a multiple of the {world} processes")
    # one seed for the data order on every rank; dropout masks differ per rank as they would across one big batch
    seed_everything(config.seed + rank)
    if task == "causal_lm" and tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_batches = _Batches(train_data, task, tokenizer, config.max_length, "train data")
    eval_batches = (
        _Batches(eval_data, task, tokenizer, config.max_length, "eval data") if eval_data is not None else None
    )
    if world > 1 and len(train_batches) < config.batch_size:
        raise ValueError(
            f"train data has {len(train_batches)} usable examples, fewer than one global batch "
            f"(TrainConfig.batch_size={config.batch_size}) to share among {world} processes"
        )
    model.to(device)
    model.train()

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    net = model
    if world > 1:
        # broadcasts rank 0's parameters and buffers, then all-reduces (averages) the trainable gradients in buckets
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    # the fused kernel updates 16M MiniLM parameters in 27 ms of CPU instead of 183 ms (per-tensor loop), ~18% of
    # a full fine-tuning step; it needs floating-point parameters on CPU or CUDA
    fused = device.type in ("cpu", "cuda") and all(p.is_floating_point() for p in params)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        fused=fused or None,
    )
    # fp16 overflows where bf16 and fp32 do not: scale the loss, skip steps whose gradients overflowed
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    steps_per_epoch = max(1, len(train_batches) // config.batch_size)  # _epoch_batches drops a partial batch
    total_steps = config.max_steps if config.max_steps is not None else math.ceil(config.epochs * steps_per_epoch)
    warmup = int(config.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (s + 1) / (warmup + 1) if s < warmup else max(0.0, (total_steps - s) / max(1, total_steps - warmup)),
    )
    gen = torch.Generator().manual_seed(config.seed)
    lengths = train_batches.mask.sum(1) if train_batches.mask is not None and config.length_buckets > 1 else None
    eval_config = _for_eval(config, task, precision)
    main = rank == 0

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    peak_rss = _rss_bytes()
    losses: list[float] = []
    eval_history: list[dict[str, float]] = []
    snapshots: list[dict[str, Any]] = []
    snapshot_time = 0.0
    finite = True
    step = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    bar = tqdm(
        total=total_steps, disable=not (config.progress and main), desc=f"train {task}", leave=False, dynamic_ncols=True
    )
    batches: list[torch.Tensor] = []
    while step < total_steps:
        if not batches:
            batches = _epoch_batches(len(train_batches), config.batch_size, lengths, config.length_buckets, gen)
        inputs, labels = train_batches.batch(_shard(batches.pop()), device)
        with _autocast(device, precision):
            logits = _forward(net, inputs)
        loss, _, _ = _loss_and_counts(task, logits, inputs, labels, train_batches.num_classes)
        if device.type == "cpu":
            peak_rss = max(peak_rss, _rss_bytes())
        (scaler.scale(loss) if scaler is not None else loss).backward()
        step += 1
        # one host sync per step: the price of catching a NaN at the step it appears rather than at the next log
        value = float(_all_reduce_sum(loss.detach().double().cpu(), device)) / world
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = (
            float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
            if config.max_grad_norm is not None
            else 0.0
        )
        checks = [("loss", value)] + ([("gradient norm", grad_norm)] if scaler is None else [])
        for what, v in checks:  # under fp16 an overflowing gradient is the scaler's business: it skips the step
            if not math.isfinite(v):
                if config.raise_on_nonfinite:
                    bar.close()
                    raise NonFiniteLossError(step, what, v)
                finite = False
        if not finite:
            optimizer.zero_grad(set_to_none=True)
            break
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(value)
        bar.update(1)
        bar.set_postfix(loss=f"{value:.3f}")
        if config.snapshot_every and step % config.snapshot_every == 0:
            t0 = time.perf_counter()
            ranks = _from_rank0(
                lambda: {r.name: int(r.energy_rank) for r in _adapter_records(model, config.energy_threshold)}
            )
            if ranks:
                snapshots.append({"step": step, "energy_ranks": ranks})
            snapshot_time += time.perf_counter() - t0
        if config.eval_every and step % config.eval_every == 0 and step < total_steps:
            metrics = evaluate(model, eval_batches or train_batches, eval_config, tokenizer)
            eval_history.append({"step": step, **{k: v for k, v in metrics.items() if v is not None}})
    bar.close()
    train_time, cpu_time = time.perf_counter() - start, time.process_time() - cpu_start

    metrics = evaluate(model, eval_batches or train_batches, eval_config, tokenizer)
    eval_history.append({"step": step, **{k: v for k, v in metrics.items() if v is not None}})
    adapters = _from_rank0(lambda: [r.as_dict() for r in _adapter_records(model, config.energy_threshold)])
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss
    return TrainResult(
        task=task,
        accuracy=float(metrics["accuracy"]),
        macro_f1=metrics["macro_f1"],
        eval_loss=float(metrics["eval_loss"]),
        perplexity=metrics["perplexity"],
        train_loss=losses,
        eval_history=eval_history,
        wall_time_s=train_time,
        cpu_time_s=cpu_time,
        snapshot_time_s=snapshot_time,
        peak_memory_bytes=int(peak),
        peak_memory_kind="cuda_allocated" if device.type == "cuda" else "cpu_rss",
        trainable_params=sum(p.numel() for p in params),
        total_params=sum(p.numel() for p in model.parameters()),
        steps=step,
        finite=finite,
        precision=precision,
        eval_split="eval" if eval_batches is not None else "train",
        world_size=world,
        snapshots=snapshots,
        adapters=adapters,
    )


def _for_eval(config: TrainConfig, task: str, precision: str) -> TrainConfig:
    return TrainConfig(
        eval_batch_size=config.eval_batch_size, max_length=config.max_length, task=task, precision=precision
    )
