"""Fusion into the shared representation z that the decoder cross-attends to.

caption / vqa: image tokens self-attend and cross-attend to the text (task token, plus the
question for vqa), so they are refined for what is asked; z = [fused image tokens ; text].
generate: there is no image; z = the prompt's text encoding.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from pipeline.config import ModelConfig
from pipeline.layers import Block, key_mask


class Fusion(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.blocks = nn.ModuleList(Block(d, cfg.n_heads, cfg.mlp_ratio, cross=True) for _ in range(cfg.fuse_layers))
        self.ln = nn.LayerNorm(d)

    def forward(self, img: torch.Tensor | None, text: torch.Tensor,
                text_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # img (B, N, d) or None; text (B, L, d) -> z (B, N+L, d), z_valid (B, N+L)
        if img is None:
            return text, text_valid
        x = img
        m = key_mask(text_valid)
        for blk in self.blocks:
            x = blk(x, ctx=text, ctx_mask=m)
        x = self.ln(x)
        ones = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return torch.cat([x, text], dim=1), torch.cat([ones, text_valid], dim=1)
