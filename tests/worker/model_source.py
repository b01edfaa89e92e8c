"""TEST-ONLY: the shipped model when its weights are present, else the untrained architecture.

The worker tests assert structure (every item has an output of the right kind), not wording, so
an untrained ``ShapesModel`` (random weights, same code path) is a faithful stand-in until the
trained checkpoint lands in pipeline/weights/. ``install()`` wraps ``pipeline.registry.load`` in
the current process only; production code is untouched.
"""

from __future__ import annotations

from typing import Any

MODEL = "loom-shapes"


def weights_shipped(name: str = MODEL) -> bool:
    from pipeline import registry

    try:
        registry.verify(registry.get(name))
        return True
    except Exception:
        return False


def untrained(name: str = MODEL, device: str = "cpu") -> Any:
    import torch

    from pipeline import registry
    from pipeline.config import ModelConfig
    from pipeline.model import LoomShapesModel, ModelInfo, ShapesModel
    from pipeline.tokenizer import Tokenizer

    entry = registry.get(name)
    tok = Tokenizer.build()
    torch.manual_seed(0)
    module = LoomShapesModel(ModelConfig(vocab_size=len(tok)), tok.numeric_start)
    info = ModelInfo(
        name=entry.name, version=f"{entry.version}-untrained", weights_sha256="0" * 64,
        tasks=entry.tasks, parameters=sum(p.numel() for p in module.parameters()),
        device=str(torch.device(registry.resolve_device(device))),
    )
    return ShapesModel(module.to(info.device), tok, info)


def install() -> None:
    """Make ``registry.load`` fall back to the untrained model when the weights are missing."""
    from pipeline import registry
    from pipeline.errors import WeightsMismatchError, WeightsMissingError

    if getattr(registry.load, "_loom_test_fallback", False):
        return
    real_load = registry.load

    def load(name: str, device: str = "auto", version: str | None = None) -> Any:
        try:
            return real_load(name, device=device, version=version)
        except (WeightsMissingError, WeightsMismatchError):
            return untrained(name, device)

    load._loom_test_fallback = True  # type: ignore[attr-defined]
    registry.load = load


def load(name: str = MODEL, device: str = "cpu") -> Any:
    install()
    from pipeline import registry

    return registry.load(name, device=device)
