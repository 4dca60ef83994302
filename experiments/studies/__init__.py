"""Study registry. A study is a module of this package with three functions and a ``NAME``::

    NAME = "my_study"                      # the config section and results sub-folder share this name

    def plan(config: dict) -> list[RunSpec]:
        # every run the study needs, from the resolved config alone (no data loaded, no training);
        # ``RunSpec.make(study, label, params)`` hashes ``params`` into the id, so a run planned by two
        # studies with equal params runs once and --resume recognises it.

    def execute(spec: RunSpec, ctx: RunContext) -> dict:
        # train/evaluate one run; return a JSON-able dict (metrics, per-adapter energy ranks, ...).
        # The runner adds run_id, study, params, seconds and finished_at and writes it atomically.

    def report(rows: list[dict], config: dict, outdir: Path) -> str:
        # rows: the finished rows of this study's plan (same order). Write Markdown tables and PNG plots under
        # ``outdir`` (this study's folder) and return a short Markdown summary for the console and summary.md.

To add a study, add its module here and one line to ``STUDIES``.
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


def get_study(name: str) -> ModuleType:
    """The study module registered as ``name``.

    Args:
        name: a key of ``STUDIES``.
    """
    if name not in STUDIES:
        raise KeyError(f"unknown study {name!r}; registered: {', '.join(STUDIES)}")
    return importlib.import_module(STUDIES[name])
