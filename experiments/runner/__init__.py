"""Support for ``experiments/run.py``: typed configuration, run specs, the results store, worker pool, per-process
caches, statistics (``analysis``) and tables/figures (``report``)."""
