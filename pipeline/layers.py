"""Small pre-LN attention blocks (own implementation: nn.TransformerEncoder warns about nested
tensors, and the decoder needs a key/value cache anyway)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.h = heads
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, d)

    def project_kv(self, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # ctx (B, S, d) -> k, v (B, h, S, d/h)
        B, S, d = ctx.shape
        k, v = self.kv(ctx).view(B, S, 2, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        return k, v

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        # x (B, T, d); mask bool broadcastable to (B, h, T, S), True = may attend
        B, T, d = x.shape
        q = self.q(x).view(B, T, self.h, d // self.h).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.out(y.transpose(1, 2).reshape(B, T, d))

    def forward(self, x: torch.Tensor, ctx: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        k, v = self.project_kv(x if ctx is None else ctx)
        return self.attend(x, k, v, mask, causal)


class MLP(nn.Module):
    def __init__(self, d: int, ratio: int):
        super().__init__()
        self.fc = nn.Linear(d, ratio * d)
        self.proj = nn.Linear(ratio * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Self-attention (+ optional cross-attention) + MLP, pre-LN residual."""

    def __init__(self, d: int, heads: int, ratio: int, cross: bool = False):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.cross = cross
        if cross:
            self.ln_c = nn.LayerNorm(d)
            self.xattn = Attention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = MLP(d, ratio)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False,
                ctx: torch.Tensor | None = None, ctx_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), mask=mask, causal=causal)
        if self.cross:
            x = x + self.xattn(self.ln_c(x), ctx=ctx, mask=ctx_mask)
        return x + self.mlp(self.ln2(x))


def key_mask(valid: torch.Tensor) -> torch.Tensor:
    """(B, S) bool of real tokens -> (B, 1, 1, S) attention mask."""
    return valid[:, None, None, :]
