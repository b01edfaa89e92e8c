"""Named models and versions. The shipped weights' sha256 is recorded here and checked at load,
so a changed or corrupted file is refused instead of silently serving something else.

    from pipeline import registry
    model = registry.load("loom-shapes", device="auto")
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipeline.errors import UnknownModelError, WeightsMismatchError, WeightsMissingError

WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    version: str
    path: Path
    sha256: str
    tasks: tuple[str, ...]


_ENTRIES: tuple[ModelEntry, ...] = (
    ModelEntry(
        name="loom-shapes",
        version="v1",
        path=WEIGHTS_DIR / "loom-shapes-v1.safetensors",
        sha256="0566c5feaf12bb8a0a1ff43f0fb56159b767971bdfc59e8bd139235990613066",
        tasks=("caption", "vqa", "generate"),
    ),
)


def list_models() -> list[ModelEntry]:
    return list(_ENTRIES)


def get(name: str, version: str | None = None) -> ModelEntry:
    """The entry for name (newest version unless one is asked for)."""
    matches = [e for e in _ENTRIES if e.name == name and (version is None or e.version == version)]
    if not matches:
        known = sorted({f"{e.name}@{e.version}" for e in _ENTRIES})
        raise UnknownModelError(name if version is None else f"{name}@{version}", known)
    return max(matches, key=lambda e: e.version)


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def verify(entry: ModelEntry) -> str:
    """Check the file against the recorded sha256; returns it."""
    from pipeline.checkpoint import sha256_file

    if not entry.path.is_file():
        raise WeightsMissingError(f"weights for {entry.name}@{entry.version} not found at {entry.path}")
    got = sha256_file(entry.path)
    if got != entry.sha256:
        raise WeightsMismatchError(str(entry.path), entry.sha256, got)
    return got


def load_entry(entry: ModelEntry, device: str = "auto") -> Any:
    """Verify and load one entry into a serving model (pipeline.model.ShapesModel)."""
    import torch

    from pipeline import checkpoint
    from pipeline.model import ModelInfo, ShapesModel

    sha = verify(entry)
    dev = resolve_device(device)
    module, tok, _ = checkpoint.load(entry.path, device=dev)
    info = ModelInfo(name=entry.name, version=entry.version, weights_sha256=sha, tasks=entry.tasks,
                     parameters=sum(p.numel() for p in module.parameters()), device=str(torch.device(dev)))
    return ShapesModel(module, tok, info)


def load(name: str, device: str = "auto", version: str | None = None) -> Any:
    """A ready serving model. `hf:<local dir or hub id>` goes to the Hugging Face adapter."""
    if name.startswith("hf:"):
        from pipeline import hf  # optional extra: only imported when asked for

        return hf.load_hf(name[3:], resolve_device(device))
    return load_entry(get(name, version), device)


def with_path(entry: ModelEntry, path: str | Path) -> ModelEntry:
    """Same entry (same expected sha256) pointing at another file, e.g. a copy."""
    return replace(entry, path=Path(path))
