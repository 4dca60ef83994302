"""Study registry. A study is a module of this package with a ``NAME``, a ``Config`` and three functions::

    NAME = "my_study"                      # the config section and results sub-folder share this name

    @dataclass(frozen=True)
    class Config:                          # the study's settings and their defaults, in one typed place
        train_size: int = 256
        ...

    def plan(config: SweepConfig, name: str = NAME) -> list[RunSpec]:
        # every run the study needs, from the configuration alone (no training); ``config.section(name)`` is the
        # study's ``Config``. ``RunSpec.make(name, label, params)`` hashes ``params`` into the id, so a run
        # planned by two studies with equal params runs once and --resume recognises it.

    def execute(spec: RunSpec, ctx: RunContext) -> dict:
        # train/evaluate one run; return a JSON-able dict (metrics, per-adapter energy ranks, ...). The runner adds
        # run_id, study, params, seconds and finished_at and writes it atomically.

    def report(rows: list[dict], config: SweepConfig, outdir: Path, name: str = NAME) -> str:
        # rows: the finished rows of this study's plan (same order). Write Markdown tables and PNG plots under
        # ``outdir`` (this study's folder) and return a short Markdown summary for the console and summary.md.

One module can serve several registered studies: an entry ``"module:OtherConfig"`` registers the module's study
again under another name with ``OtherConfig`` (a subclass of ``Config`` with other defaults, e.g. the ViT and
clip art instead of MiniLM and WordNet) as its section; ``plan`` and ``report`` receive that name. So the text and
vision versions of a study share every line of code and differ only in their defaults.

A study never imports another study; code two study modules share lives in a module whose name starts with ``_``
(``_classification``, ``_allocation``). To add a study, add its module here and one line to ``STUDIES``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

# name -> "module" or "module:ConfigClass"; the order is the order studies are planned and reported in.
STUDIES: dict[str, str] = {
    "rank_vs_classes": "experiments.studies.rank_vs_classes",
    "layerwise": "experiments.studies.layerwise",
    "label_noise": "experiments.studies.label_noise",
    "rank_vs_classes_vit": "experiments.studies.rank_vs_classes:VitConfig",
    "layerwise_vit": "experiments.studies.layerwise:VitConfig",
    "label_noise_vit": "experiments.studies.label_noise:VitConfig",
    "rank_vs_classes_vit_fmnist": "experiments.studies.rank_vs_classes:VitFashionConfig",
    "layerwise_vit_fmnist": "experiments.studies.layerwise:VitFashionConfig",
    "rank_vs_classes_vit_112": "experiments.studies.rank_vs_classes:Vit112Config",
    "layerwise_vit_112": "experiments.studies.layerwise:Vit112Config",
    "lora_vs_full": "experiments.studies.lora_vs_full",
    "rank_allocation": "experiments.studies.rank_allocation",
    "rank_allocation_causal_lm": "experiments.studies.rank_allocation_causal_lm",
    "rank_prediction": "experiments.studies.rank_prediction",
    "allocation_paired": "experiments.studies.allocation_paired",
    "allocation_paired_vit": "experiments.studies.allocation_paired:VitConfig",
}

# what `python experiments/run.py` runs with no --config: studies 1-3 with their controls on the text model, and a
# small slice of the same three on the ViT, within the 15-minute budget
DEFAULT_STUDIES = (
    "rank_vs_classes",
    "layerwise",
    "label_noise",
    "rank_vs_classes_vit",
    "layerwise_vit",
    "label_noise_vit",
)


@dataclass(frozen=True)
class Study:
    """A registered study: its module, bound to the name it is registered under, and its section's ``Config``.

    Args:
        name: the registered name (config section, results sub-folder, ``RunSpec.study``).
        module: the study module.
        Config: the section's dataclass (the module's ``Config`` or the variant named in the registry).
    """

    name: str
    module: ModuleType
    Config: type

    @property
    def summary(self) -> str:
        """First line of the variant's ``Config`` docstring, or of the module's."""
        doc = self.Config.__doc__ if self.Config is not getattr(self.module, "Config", None) else self.module.__doc__
        return (doc or "").strip().splitlines()[0] if doc else ""

    def plan(self, config: Any) -> list[Any]:
        """The module's ``plan`` for this name."""
        return self.module.plan(config, self.name)

    def execute(self, spec: Any, ctx: Any) -> dict[str, Any]:
        """The module's ``execute``."""
        return self.module.execute(spec, ctx)

    def report(self, rows: list[dict[str, Any]], config: Any, outdir: Path) -> str:
        """The module's ``report`` for this name."""
        return self.module.report(rows, config, outdir, self.name)


def get_study(name: str) -> Study:
    """The study registered as ``name``.

    Args:
        name: a key of ``STUDIES``.
    """
    if name not in STUDIES:
        raise KeyError(f"unknown study {name!r}; registered: {', '.join(STUDIES)}")
    module_name, _, config_name = STUDIES[name].partition(":")
    module = importlib.import_module(module_name)
    return Study(name, module, getattr(module, config_name or "Config"))
