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
FINETUNED_TASKS = ("caption", "vqa")  # what a fine-tuned version serves (load_file)


@dataclass(frozen=True)
class ModelEntry:
    name: str
    version: str
    path: Path
    sha256: str
    tasks: tuple[str, ...]
    # the embed task's projection head (pipeline/train_embed.py), pinned like the weights
    embed_head: Path | None = None
    embed_head_sha256: str = ""


_ENTRIES: tuple[ModelEntry, ...] = (
    ModelEntry(
        name="loom-shapes",
        version="v1",
        path=WEIGHTS_DIR / "loom-shapes-v1.safetensors",
        sha256="0566c5feaf12bb8a0a1ff43f0fb56159b767971bdfc59e8bd139235990613066",
        tasks=("caption", "vqa", "generate", "embed"),
        embed_head=WEIGHTS_DIR / "loom-shapes-v1-embed.safetensors",
        embed_head_sha256="b24f569bc2db2f1c90624eee19d7c3c3245c6efb89d0fc9371687b5a5b261570",
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


def verify(entry: ModelEntry, path: Path | None = None, sha256: str | None = None) -> str:
    """Check the file (the weights, or ``path``) against the recorded sha256; returns it."""
    from pipeline.checkpoint import sha256_file

    path, expected = (entry.path, entry.sha256) if path is None else (path, sha256 or "")
    if not path.is_file():
        raise WeightsMissingError(f"weights for {entry.name}@{entry.version} not found at {path}")
    got = sha256_file(path)
    if got != expected:
        raise WeightsMismatchError(str(path), expected, got)
    return got


def load_entry(entry: ModelEntry, device: str = "auto", with_head: bool = True) -> Any:
    """Verify and load one entry into a serving model (pipeline.model.ShapesModel)."""
    import torch

    from pipeline import checkpoint
    from pipeline.model import ModelInfo, ShapesModel, load_embed_head

    sha = verify(entry)
    dev = resolve_device(device)
    module, tok, _ = checkpoint.load(entry.path, device=dev)
    head = None
    if with_head and entry.embed_head is not None:
        verify(entry, entry.embed_head, entry.embed_head_sha256)
        head = load_embed_head(str(entry.embed_head), device=dev)
    info = ModelInfo(name=entry.name, version=entry.version, weights_sha256=sha, tasks=entry.tasks,
                     parameters=sum(p.numel() for p in module.parameters()), device=str(torch.device(dev)))
    return ShapesModel(module, tok, info, embed_head=head)


def load(name: str, device: str = "auto", version: str | None = None) -> Any:
    """A ready serving model. `hf:<local dir or hub id>` goes to the Hugging Face adapter,
    `diffusers:<local dir or hub id>` to the diffusers one."""
    if name.startswith("hf:"):
        from pipeline import hf  # optional extra: only imported when asked for

        return hf.load_hf(name[3:], resolve_device(device))
    if name.startswith("diffusers:"):
        from pipeline import diffusion  # optional extra, as above

        return diffusion.load_diffusers(name[len("diffusers:"):], resolve_device(device))
    return load_entry(get(name, version), device)


def load_file(path: str | Path, *, name: str, version: str, sha256: str,
              device: str = "auto") -> Any:
    """A fine-tuned model's weights file, verified against ``sha256`` and served as
    ``name@version``: caption and vqa, what fine-tuning teaches. Not generate (labelled rows
    carry no layouts, so a new word would be drawn as something else) and not embed (the
    embedding head belongs to the base's weights)."""
    entry = ModelEntry(name=name, version=version, path=Path(path), sha256=sha256,
                       tasks=FINETUNED_TASKS)
    return load_entry(entry, device, with_head=False)


def with_path(entry: ModelEntry, path: str | Path) -> ModelEntry:
    """Same entry (same expected sha256) pointing at another file, e.g. a copy."""
    return replace(entry, path=Path(path))
