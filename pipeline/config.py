"""Model configuration, stored as JSON inside the checkpoint's safetensors metadata."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 128
    d_model: int = 128
    n_heads: int = 4
    mlp_ratio: int = 4
    image_size: int = 64           # model input side; everything is resized to this
    grid: int = 8                  # image tokens per side (image_size / 8 px patches)
    stem_channels: tuple[int, int] = (32, 64)
    image_layers: int = 1          # self-attention blocks over image tokens
    text_layers: int = 2           # text encoder blocks
    fuse_layers: int = 1           # image tokens <- text cross-attention blocks
    decoder_layers: int = 2        # autoregressive decoder blocks
    max_text_len: int = 24         # prompt / question length incl. task token
    max_out_len: int = 24          # decoder output length incl. <bos>
    n_numeric: int = 64            # layout tokens n0..n63
    renderer_hidden: int = 64
    renderer_freqs: int = 6
    n_shapes: int = 3

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        raw = json.loads(text)
        known = {f.name for f in fields(cls)}
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items() if k in known}
        return cls(**kw)
