"""PEFT's AdaLoRA as an outside baseline of the rank-allocation studies.

``adalora_config`` sizes AdaLoRA's budget schedule to a run's step count, ``adalora_step_hook`` calls its
``update_and_allocate`` after every optimizer step of any training loop, and ``adalora_ranks`` reads the ranks it
ended with. ``train_adalora`` puts the three around ``lora_fast.train.train``.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["adalora_config", "adalora_ranks", "adalora_step_hook", "train_adalora"]


def adalora_config(
    target_modules: Sequence[str],
    total_step: int,
    target_r: int = 8,
    init_r: int = 12,
    lora_alpha: float = 16.0,
    modules_to_save: Sequence[str] | None = None,
    task_type: str | None = None,
) -> Any:
    """PEFT ``AdaLoraConfig`` for a run of ``total_step`` optimizer steps: ranks start at ``init_r`` and are pruned
    to an average of ``target_r`` between 10% and 70% of training (AdaLoRA's cubic budget schedule), then frozen.

    Args:
        target_modules: module-name suffixes to adapt.
        total_step: optimizer steps of the whole run.
        target_r: average final rank (the budget uniform r=``target_r`` has, counted in ranks).
        init_r: starting rank of every module.
        lora_alpha: alpha.
        modules_to_save: extra fully trained modules (e.g. a classifier head).
        task_type: PEFT task type, e.g. ``"SEQ_CLS"`` or ``"CAUSAL_LM"``.
    """
    from peft import AdaLoraConfig

    tinit = max(1, total_step // 10)
    tfinal = max(1, (3 * total_step) // 10)
    return AdaLoraConfig(
        target_modules=list(target_modules),
        init_r=init_r,
        target_r=target_r,
        lora_alpha=lora_alpha,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=max(1, total_step // 20),
        total_step=total_step,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        task_type=task_type,
    )


def adalora_step_hook(peft_model: nn.Module) -> Callable[[], None]:
    """Call AdaLoRA's ``update_and_allocate`` after every optimizer step of any optimizer (a global post-step
    hook, so it works with a training loop that knows nothing about AdaLoRA). Returns the function that removes it.

    AdaLoRA reads ``p.grad`` in the update, so the loop must zero gradients after ``optimizer.step()``, not
    between ``backward()`` and ``step()``.

    Args:
        peft_model: the ``PeftModel`` from ``get_peft_model(model, adalora_config(...))``.
    """
    from torch.optim.optimizer import register_optimizer_step_post_hook

    step = [0]

    def after_step(_optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        step[0] += 1
        peft_model.base_model.update_and_allocate(step[0])

    return register_optimizer_step_post_hook(after_step).remove


def adalora_ranks(peft_model: nn.Module, prefix: str = "base_model.model.") -> dict[str, int]:
    """Real per-module ranks of a trained AdaLoRA model: singular values left unmasked (non-zero ``lora_E``).

    Args:
        peft_model: the trained ``PeftModel``.
        prefix: wrapper prefix to drop so names match ``find_targets`` on the bare model.
    """
    ranks = {}
    for name, module in peft_model.named_modules():
        lora_e = getattr(module, "lora_E", None)
        if isinstance(lora_e, nn.ParameterDict) and "default" in lora_e:
            key = name[len(prefix) :] if name.startswith(prefix) else name
            ranks[key] = int((lora_e["default"] != 0).sum())
    return ranks


def train_adalora(
    base: nn.Module,
    config: Any,
    train_data: Any,
    eval_data: Any,
    train_config: Any,
    tokenizer: Any = None,
    seed: int = 0,
) -> tuple[Any, nn.Module, dict[str, int]]:
    """Wrap ``base`` with AdaLoRA and train it with ``lora_fast.train.train``; returns (result, model, ranks).

    Args:
        base: the bare model.
        config: from ``adalora_config``.
        train_data: training data for ``train``.
        eval_data: evaluation data for ``train``.
        train_config: a ``lora_fast.train.TrainConfig`` whose step count matches ``config.total_step``.
        tokenizer: for text data.
        seed: seeds the adapters' initialisation.
    """
    from peft import get_peft_model

    from lora_fast.train import train

    torch.manual_seed(seed)
    model = get_peft_model(base, config)  # SEQ_CLS keeps the classifier head fully trainable, as the LoRA runs do
    remove = adalora_step_hook(model)
    try:
        result = train(model, train_data, eval_data, train_config, tokenizer)
    finally:
        remove()
    return result, model, adalora_ranks(model)
