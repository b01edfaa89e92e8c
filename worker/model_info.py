"""Reading a loaded model's ``info`` (name, version, weights_sha256, tasks, params), which the
serving seam leaves to each backend: a dataclass, any object, or a dict. The model stage
(worker/inference.py), the result cache (worker/cache.py) and the lineage of stored results
(worker/outputs.py) all read it, so it lives below the three of them."""

from __future__ import annotations

from typing import Any


def info_field(info: Any, name: str, default: Any = None) -> Any:
    """Read one field of ``model.info`` (a dataclass, an object or a dict)."""
    if isinstance(info, dict):
        return info.get(name, default)
    return getattr(info, name, default)
