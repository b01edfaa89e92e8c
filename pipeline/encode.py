"""Encoders: images -> 8x8 grid tokens, text -> contextual token vectors."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.config import ModelConfig
from pipeline.layers import Block, key_mask


def sincos_2d(grid: int, d: int) -> torch.Tensor:
    """(grid*grid, d): first half encodes the row, second half the column."""
    q = d // 4
    omega = 1.0 / (100.0 ** (torch.arange(q, dtype=torch.float32) / q))
    pos = torch.arange(grid, dtype=torch.float32)[:, None] * omega[None]        # (grid, q)
    axis = torch.cat([pos.sin(), pos.cos()], dim=1)                             # (grid, d/2)
    rows = axis[:, None, :].expand(grid, grid, d // 2)
    cols = axis[None, :, :].expand(grid, grid, d // 2)
    return torch.cat([rows, cols], dim=-1).reshape(grid * grid, d)


class ImageEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c1, c2 = cfg.stem_channels
        d = cfg.d_model
        # three stride-2 convs, 64 -> 32 -> 16 -> 8; the first one's 4x4 kernels overlap, so
        # 1-px edge detail (a 10-px triangle vs circle) survives the downsampling
        self.convs = nn.ModuleList([
            nn.Conv2d(3, c1, 4, stride=2, padding=1),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1),
            nn.Conv2d(c2, d, 3, stride=2, padding=1),
        ])
        # GroupNorm (batch-independent, so serving at batch 1 == batch 64) speeds up the stem
        self.norms = nn.ModuleList([nn.GroupNorm(8, c1), nn.GroupNorm(8, c2), nn.GroupNorm(8, d)])
        # fixed 2D sinusoids at feature scale: the relation (left-of vs above) depends on where
        # tokens are, and a small learned embedding alone was drowned by the conv features
        self.register_buffer("pos2d", sincos_2d(cfg.grid, d), persistent=False)
        self.row = nn.Parameter(torch.zeros(cfg.grid, 1, d))
        self.col = nn.Parameter(torch.zeros(1, cfg.grid, d))
        nn.init.normal_(self.row, std=0.02)
        nn.init.normal_(self.col, std=0.02)
        self.blocks = nn.ModuleList(Block(d, cfg.n_heads, cfg.mlp_ratio) for _ in range(cfg.image_layers))
        self.ln = nn.LayerNorm(d)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # pixels (B, 3, 64, 64) in [-1, 1] -> tokens (B, 64, d)
        x = pixels
        for conv, norm in zip(self.convs, self.norms):
            x = F.gelu(norm(conv(x)))                           # ... -> (B, d, 8, 8)
        x = x.flatten(2).transpose(1, 2)                         # (B, 64, d)
        x = x + self.pos2d + (self.row + self.col).reshape(1, -1, x.shape[-1])
        for blk in self.blocks:
            x = blk(x)
        return self.ln(x)


class TextEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.tok = nn.Embedding(cfg.vocab_size, d)
        self.pos = nn.Embedding(cfg.max_text_len, d)
        self.blocks = nn.ModuleList(Block(d, cfg.n_heads, cfg.mlp_ratio) for _ in range(cfg.text_layers))
        self.ln = nn.LayerNorm(d)

    def forward(self, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        # ids (B, L), valid (B, L) bool -> (B, L, d)
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.tok(ids) + self.pos(pos)[None]
        m = key_mask(valid)
        for blk in self.blocks:
            x = blk(x, mask=m)
        return self.ln(x)
