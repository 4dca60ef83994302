"""Offline models for the experiments, converted from files shipped in PyPI packages."""
