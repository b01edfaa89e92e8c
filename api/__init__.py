"""Loom's HTTP API (FastAPI). Imports loom and the torch-free worker.app only."""
