"""``RunSpec``: one training run of a study, identified by a hash of everything that determines its result."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any


def run_id(label: str, params: dict[str, Any]) -> str:
    """``<label>-<8 hex digits>``; the digits hash ``params``, so equal params give the same id in every study.

    Args:
        label: short readable prefix, e.g. ``"lora-n04-s1"``.
        params: JSON-able parameters of the run.
    """
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]
    return f"{label}-{digest}"


@dataclass(frozen=True)
class RunSpec:
    """A planned run.

    Args:
        study: name of the study module whose ``execute`` runs it (two studies may plan the same run; it runs once).
        run_id: unique id, from ``run_id(label, params)``.
        params: JSON-able parameters; the runner stores them in the result row.
    """

    study: str
    run_id: str
    params: dict[str, Any]

    @classmethod
    def make(cls, study: str, label: str, params: dict[str, Any]) -> RunSpec:
        """A spec whose id hashes ``params``.

        Args:
            study: executing study.
            label: readable id prefix.
            params: run parameters.
        """
        return cls(study, run_id(label, params), params)
