"""Experiments on what rank LoRA adapters learn; run them with ``python experiments/run.py``."""
