"""Registry: names, versions, sha256 pinning, unknown names, hf: delegation."""
from __future__ import annotations

import shutil
import sys
import types
from pathlib import Path

import pytest

import pipeline
from pipeline import registry
from pipeline.errors import PipelineError, UnknownModelError, WeightsMismatchError, WeightsMissingError


def test_list_and_get() -> None:
    names = [(e.name, e.version) for e in registry.list_models()]
    assert ("loom-shapes", "v1") in names
    e = registry.get("loom-shapes")
    assert e.version == "v1" and e.tasks == ("caption", "vqa", "generate", "embed")
    assert len(e.sha256) == 64 and len(e.embed_head_sha256) == 64
    assert registry.get("loom-shapes", "v1") == e


def test_unknown_model_names_the_known_ones() -> None:
    with pytest.raises(UnknownModelError, match="loom-shapes@v1") as ei:
        registry.load("no-such-model")
    assert isinstance(ei.value, PipelineError)
    with pytest.raises(UnknownModelError):
        registry.get("loom-shapes", "v999")


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    entry = registry.get("loom-shapes")
    copy = tmp_path / "tampered.safetensors"
    shutil.copyfile(entry.path, copy)
    registry.load_entry(registry.with_path(entry, copy), device="cpu")     # the intact copy loads
    raw = bytearray(copy.read_bytes())
    raw[-100] ^= 0x01                                                     # flip one bit of a weight
    copy.write_bytes(bytes(raw))
    with pytest.raises(WeightsMismatchError) as ei:
        registry.load_entry(registry.with_path(entry, copy), device="cpu")
    msg = str(ei.value)
    assert entry.sha256 in msg and "expected" in msg and "got" in msg and str(copy) in msg


def test_missing_weights(tmp_path: Path) -> None:
    entry = registry.with_path(registry.get("loom-shapes"), tmp_path / "gone.safetensors")
    with pytest.raises(WeightsMissingError):
        registry.load_entry(entry)


def test_hf_names_are_delegated(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    fake = types.ModuleType("pipeline.hf")
    fake.load_hf = lambda path_or_id, device: calls.append((path_or_id, device)) or "hf-model"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pipeline.hf", fake)
    monkeypatch.setattr(pipeline, "hf", fake, raising=False)
    assert registry.load("hf:/models/blip", device="cpu") == "hf-model"
    assert calls == [("/models/blip", "cpu")]


def test_auto_device() -> None:
    import torch

    assert registry.resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert registry.resolve_device("cpu") == "cpu"
