"""The finetune job: its one item's input, checked at submit and again in the worker.

A finetune job has a single item. Its input names a rows manifest in the tenant's storage (JSON
lines ``{"image_key", "caption"?, "question"?, "answer"?}``, hashed), the base model, the name to
register and the hyperparameters. The item runs like any other: claimed under a lease that its
worker heartbeats while it trains, checkpointed to storage, so a killed worker's lease expires
and the next claim resumes from the last checkpoint; its output is the registered model version.

Torch-free: the API and the CLI import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from loom.errors import InvalidRequest, LoomError

TASK = "finetune"
# name -> (type, minimum, maximum, default); pipeline.finetune.Hyper has the same fields.
HYPER: dict[str, tuple[type, float, float, Any]] = {
    "steps": (int, 1, 100_000, 1500),
    "lr": (float, 1e-6, 1.0, 1e-3),
    "batch": (int, 1, 1024, 32),
    "replay": (int, 0, 1024, 16),
    "seed": (int, 0, 2**31 - 1, 0),
    "ckpt_every": (int, 1, 100_000, 100),
}


def check_hyper(hyper: Mapping[str, Any] | None, *, where: str = "hyper",
                error: type[LoomError] = InvalidRequest) -> dict[str, Any]:
    """Every hyperparameter with its default filled in; an unknown name or a value out of range
    is an error naming it."""
    out = {k: spec[3] for k, spec in HYPER.items()}
    for name, value in (hyper or {}).items():
        if name not in HYPER:
            raise error(f"{where}.{name}: unknown (valid: {', '.join(HYPER)})")
        kind, lo, hi, _ = HYPER[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                kind is int and not isinstance(value, int)):
            raise error(f"{where}.{name}: expected {kind.__name__}, got {value!r:.40}")
        if not lo <= value <= hi:
            raise error(f"{where}.{name}: must be between {lo} and {hi}, got {value}")
        out[name] = kind(value)
    return out


def check_input(inp: Mapping[str, Any], *, where: str = "input",
                error: type[LoomError] = InvalidRequest) -> dict[str, Any]:
    """The finetune item's input, checked (the name rules are the registry's)."""
    from loom.jobs.registry import check_name

    allowed = {"rows_key", "rows_sha256", "rows", "name", "base", "hyper", "val_fraction"}
    extra = sorted(set(inp) - allowed)
    if extra:
        raise error(f"{where}: a finetune item takes no {extra[0]!r}")
    for key in ("rows_key", "rows_sha256", "name", "base"):
        if not isinstance(inp.get(key), str) or not inp[key]:
            raise error(f"{where}.{key}: required")
    rows = inp.get("rows")
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise error(f"{where}.rows: expected the number of labelled rows (>= 1)")
    val = inp.get("val_fraction", 0.1)
    if isinstance(val, bool) or not isinstance(val, (int, float)) or not 0 <= val < 0.5:
        raise error(f"{where}.val_fraction: must be in [0, 0.5), got {val!r:.40}")
    try:
        check_name(str(inp["name"]))
    except InvalidRequest as exc:
        raise error(f"{where}.{exc.message}") from exc
    return {**inp, "val_fraction": float(val),
            "hyper": check_hyper(inp.get("hyper"), where=f"{where}.hyper", error=error)}
