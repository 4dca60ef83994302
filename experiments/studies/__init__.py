"""Study registry. A study is a module of this package with a ``NAME``, a ``Config`` and three functions::

    NAME = "my_study"                      # the config section and results sub-folder share this name

    @dataclass(frozen=True)
    class Config:                          # the study's settings and their defaults, in one typed place
        train_size: int = 256
        ...

    def plan(config: SweepConfig) -> list[RunSpec]:
        # every run the study needs, from the configuration alone (no training); ``config.section(NAME)`` is the
        # study's ``Config``. ``RunSpec.make(study, label, params)`` hashes ``params`` into the id, so a run
        # planned by two studies with equal params runs once and --resume recognises it.

    def execute(spec: RunSpec, ctx: RunContext) -> dict:
        # train/evaluate one run; return a JSON-able dict (metrics, per-adapter energy ranks, ...). The runner adds
        # run_id, study, params, seconds and finished_at and writes it atomically.

    def report(rows: list[dict], config: SweepConfig, outdir: Path) -> str:
        # rows: the finished rows of this study's plan (same order). Write Markdown tables and PNG plots under
        # ``outdir`` (this study's folder) and return a short Markdown summary for the console and summary.md.

A study never imports another study; code two studies share lives in a module whose name starts with ``_``
(``_classification``, ``_allocation``). To add a study, add its module here and one line to ``STUDIES``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# name -> module; the order is the order studies are planned and reported in.
STUDIES: dict[str, str] = {
    "rank_vs_classes": "experiments.studies.rank_vs_classes",
    "layerwise": "experiments.studies.layerwise",
    "label_noise": "experiments.studies.label_noise",
    "lora_vs_full": "experiments.studies.lora_vs_full",
    "rank_allocation": "experiments.studies.rank_allocation",
    "rank_allocation_causal_lm": "experiments.studies.rank_allocation_causal_lm",
}

# what `python experiments/run.py` runs with no --config: studies 1-3 and their controls fill the 15-minute budget
DEFAULT_STUDIES = ("rank_vs_classes", "layerwise", "label_noise")


def get_study(name: str) -> ModuleType:
    """The study module registered as ``name``.

    Args:
        name: a key of ``STUDIES``.
    """
    if name not in STUDIES:
        raise KeyError(f"unknown study {name!r}; registered: {', '.join(STUDIES)}")
    return importlib.import_module(STUDIES[name])
