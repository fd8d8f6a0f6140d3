"""Runnable examples shipped with the package: `python -m pyeccv.examples.<name>`."""
