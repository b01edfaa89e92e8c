"""Loom core: database, job state machine, storage. No torch, no web framework, no worker code."""

__version__ = "0.1.0"
