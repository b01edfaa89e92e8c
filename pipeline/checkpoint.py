"""Checkpoint file format: safetensors weights + config/tokenizer JSON in the metadata."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline.config import ModelConfig
from pipeline.model import LoomShapesModel
from pipeline.tokenizer import Tokenizer


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(path: str | Path, model: LoomShapesModel, tok: Tokenizer, name: str, version: str,
         dtype: torch.dtype = torch.float32) -> str:
    """Write the weights; returns the file's sha256."""
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    meta = {"config": model.cfg.to_json(), "tokenizer": tok.to_json(), "name": name, "version": version}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return sha256_file(path)


def read_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load(path: str | Path, device: str = "cpu") -> tuple[LoomShapesModel, Tokenizer, dict[str, str]]:
    meta = read_metadata(path)
    cfg = ModelConfig.from_json(meta["config"])
    tok = Tokenizer.from_json(meta["tokenizer"])
    model = LoomShapesModel(cfg, tok.numeric_start)
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    model.load_state_dict(state)
    return model.to(device).eval(), tok, meta
