"""Offline datasets for the experiments, read from Debian or PyPI packages installed on the machine."""
