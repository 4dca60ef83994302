"""Run the LoRA intrinsic-rank studies: ``python experiments/run.py --help``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Must be set before torch loads OpenMP. Spinning OpenMP threads collapse when anything else uses the CPU: on this
# 2-core machine with one other busy process, a 6-layer MiniLM LoRA step took 1.88 s with 2 spinning threads,
# 0.30 s with 1 thread and 0.23 s with 2 passive threads (full fine-tuning: 4.46 / 0.67 / 0.52 s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# run as a script: make the repository root importable so ``experiments`` resolves as a package. Appended, not
# prepended: an installed lora_fast (with its compiled _C) must win over the source folder of the same name.
sys.path.append(str(Path(__file__).resolve().parents[1]))

from experiments.runner.cli import main

if __name__ == "__main__":
    sys.exit(main())
