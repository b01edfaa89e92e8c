"""Decoders: autoregressive text/layout decoder with a KV cache (greedy, beam, sampling),
and the image decoder (a learned implicit mask renderer + compositor)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.config import ModelConfig
from pipeline.layers import Block, key_mask


def value_features(n: int, dims: int = 16) -> torch.Tensor:
    """Sinusoidal features of 0..n-1 so that nearby numbers start with nearby embeddings."""
    v = torch.arange(n, dtype=torch.float32)[:, None] / n
    f = torch.pi * (2.0 ** torch.arange(dims // 2, dtype=torch.float32))[None]
    return torch.cat([torch.sin(v * f), torch.cos(v * f)], dim=1)


class TextDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig, numeric_start: int):
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, d)
        feats = torch.zeros(cfg.vocab_size, 16)
        feats[numeric_start:numeric_start + cfg.n_numeric] = value_features(cfg.n_numeric)
        self.register_buffer("num_feats", feats, persistent=False)
        self.num_proj = nn.Linear(16, d, bias=False)
        self.pos = nn.Embedding(cfg.max_out_len, d)
        self.blocks = nn.ModuleList(Block(d, cfg.n_heads, cfg.mlp_ratio, cross=True) for _ in range(cfg.decoder_layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.vocab_size)

    def embed(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if torch.is_inference_mode_enabled():
            # serving: one gather per step instead of gather + projection (decoding at batch 1
            # is bound by per-op overhead); rebuilt whenever the weights change
            key = (self.tok.weight._version, self.num_proj.weight._version, self.tok.weight.data_ptr(),
                   self.tok.weight.dtype, self.tok.weight.device)
            if getattr(self, "_table_key", None) != key:
                self._table = self.tok.weight + self.num_proj(self.num_feats)
                self._table_key = key
            return self._table[ids] + self.pos(pos)
        return self.tok(ids) + self.num_proj(self.num_feats[ids]) + self.pos(pos)

    def forward(self, ids: torch.Tensor, z: torch.Tensor, z_valid: torch.Tensor) -> torch.Tensor:
        # teacher forcing: ids (B, T), z (B, S, d) -> logits (B, T, V)
        x = self.embed(ids, torch.arange(ids.shape[1], device=ids.device)[None])
        m = key_mask(z_valid)
        for blk in self.blocks:
            x = blk(x, causal=True, ctx=z, ctx_mask=m)
        return self.head(self.ln(x))

    # ---- incremental decoding with a key/value cache
    def init_cache(self, z: torch.Tensor, z_valid: torch.Tensor) -> dict:
        B, h, L = z.shape[0], self.cfg.n_heads, self.cfg.max_out_len
        hd = self.cfg.d_model // h
        cross = [blk.xattn.project_kv(z) for blk in self.blocks]    # computed once, reused each step
        # same dtype as the projections (bf16 under autocast), so attention sees one dtype
        dt = cross[0][0].dtype
        self_kv = [(z.new_zeros(B, h, L, hd, dtype=dt), z.new_zeros(B, h, L, hd, dtype=dt)) for _ in self.blocks]
        return {"cross": cross, "self": self_kv, "mask": key_mask(z_valid)}

    @staticmethod
    def reorder_cache(cache: dict, index: torch.Tensor) -> dict:
        """Beam search: keep the rows of the beams that survived."""
        return {"cross": cache["cross"], "mask": cache["mask"],
                "self": [(k.index_select(0, index), v.index_select(0, index)) for k, v in cache["self"]]}

    def step(self, ids: torch.Tensor, t: int, cache: dict) -> torch.Tensor:
        # ids (B,) at position t -> logits (B, V); writes this position's k/v into the cache
        x = self.embed(ids[:, None], torch.full((1, 1), t, device=ids.device, dtype=torch.long))
        for blk, (ck, cv), (sk, sv) in zip(self.blocks, cache["cross"], cache["self"]):
            hx = blk.ln1(x)
            k, v = blk.attn.project_kv(hx)                         # (B, h, 1, hd)
            sk[:, :, t:t + 1] = k
            sv[:, :, t:t + 1] = v
            x = x + blk.attn.attend(hx, sk[:, :, :t + 1], sv[:, :, :t + 1])
            x = x + blk.xattn.attend(blk.ln_c(x), ck, cv, cache["mask"])
            x = x + blk.mlp(blk.ln2(x))
        return self.head(self.ln(x))[:, 0]


def greedy(dec: TextDecoder, z: torch.Tensor, z_valid: torch.Tensor, bos: int, eos: int,
           max_len: int | None = None) -> torch.Tensor:
    """-> (B, T) token ids (without <bos>), <eos>-terminated or cut at max_len."""
    max_len = min(max_len or dec.cfg.max_out_len, dec.cfg.max_out_len)
    B = z.shape[0]
    cache = dec.init_cache(z, z_valid)
    cur = torch.full((B,), bos, dtype=torch.long, device=z.device)
    done = torch.zeros(B, dtype=torch.bool, device=z.device)
    out = []
    for t in range(max_len - 1):
        cur = dec.step(cur, t, cache).argmax(-1)
        cur = torch.where(done, torch.full_like(cur, eos), cur)
        out.append(cur)
        done |= cur == eos
        if bool(done.all()):
            break
    return torch.stack(out, 1)


def beam_search(dec: TextDecoder, z: torch.Tensor, z_valid: torch.Tensor, bos: int, eos: int,
                beams: int = 4, max_len: int | None = None) -> torch.Tensor:
    """Batched beam search: every item keeps `beams` hypotheses; -> best (B, T)."""
    max_len = min(max_len or dec.cfg.max_out_len, dec.cfg.max_out_len)
    B, K = z.shape[0], beams
    zk = z.repeat_interleave(K, 0)
    cache = dec.init_cache(zk, z_valid.repeat_interleave(K, 0))
    scores = torch.full((B, K), -math.inf, device=z.device)
    scores[:, 0] = 0.0                                   # all beams start identical: keep one
    cur = torch.full((B * K,), bos, dtype=torch.long, device=z.device)
    done = torch.zeros(B * K, dtype=torch.bool, device=z.device)
    seqs = torch.zeros(B * K, 0, dtype=torch.long, device=z.device)
    for t in range(max_len - 1):
        logp = F.log_softmax(dec.step(cur, t, cache).float(), -1)          # (B*K, V)
        # a finished hypothesis may only continue with <eos>, at no cost
        logp[done] = -math.inf
        logp[done, eos] = 0.0
        V = logp.shape[-1]
        total = (scores.reshape(B * K, 1) + logp).view(B, K * V)
        scores, idx = total.topk(K, dim=1)                                  # (B, K)
        src = (idx // V + torch.arange(B, device=z.device)[:, None] * K).reshape(-1)
        cur = (idx % V).reshape(-1)
        seqs = torch.cat([seqs.index_select(0, src), cur[:, None]], 1)
        done = done.index_select(0, src) | (cur == eos)
        cache = dec.reorder_cache(cache, src)
        if bool(done.all()):
            break
    best = scores.argmax(1) + torch.arange(B, device=z.device) * K
    return seqs.index_select(0, best)


def sample(dec: TextDecoder, z: torch.Tensor, z_valid: torch.Tensor, bos: int, eos: int,
           generators: list[torch.Generator], temperature: float = 0.8, top_p: float = 0.9,
           max_len: int | None = None) -> torch.Tensor:
    """Ancestral sampling with nucleus filtering; item i draws only from generators[i], so
    its result depends on its own seed, not on the rest of the batch."""
    max_len = min(max_len or dec.cfg.max_out_len, dec.cfg.max_out_len)
    B = z.shape[0]
    cache = dec.init_cache(z, z_valid)
    cur = torch.full((B,), bos, dtype=torch.long, device=z.device)
    done = torch.zeros(B, dtype=torch.bool, device=z.device)
    out = []
    for t in range(max_len - 1):
        probs = F.softmax(dec.step(cur, t, cache).float().cpu() / temperature, -1)
        sp, si = probs.sort(-1, descending=True)
        keep = (sp.cumsum(-1) - sp) < top_p                 # smallest set with mass >= top_p
        sp = sp * keep
        cdf = sp.cumsum(-1) / sp.sum(-1, keepdim=True)
        u = torch.stack([torch.rand(1, generator=g) for g in generators])   # (B, 1)
        pick = (cdf < u).sum(-1).clamp(max=cdf.shape[-1] - 1)
        nxt = si.gather(1, pick[:, None])[:, 0].to(z.device)
        cur = torch.where(done, torch.full_like(nxt, eos), nxt)
        out.append(cur)
        done |= cur == eos
        if bool(done.all()):
            break
    return torch.stack(out, 1)


class MaskRenderer(nn.Module):
    """Implicit network: (shape, box side, pixel position in box coordinates) -> coverage logit.
    Fourier features let a small MLP draw sharp, anti-aliased edges."""

    MARGIN = 2

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, nf = cfg.renderer_hidden, cfg.renderer_freqs
        self.register_buffer("freqs", torch.pi * 2.0 ** torch.arange(nf, dtype=torch.float32), persistent=False)
        self.shape_emb = nn.Embedding(cfg.n_shapes, h)
        self.inp = nn.Linear(4 * nf + 3, h)
        self.hidden = nn.ModuleList(nn.Linear(h, h) for _ in range(2))
        self.out = nn.Linear(h, 1)
        self.window = 30 + 2 * self.MARGIN                  # largest box + margins

    def forward(self, shape: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        # shape (N,) long, side (N,) float -> coverage logits (N, W, W) over the box window
        W = self.window
        j = torch.arange(W, device=side.device, dtype=torch.float32) - self.MARGIN + 0.5
        u = j[None, :] / side[:, None] - 0.5                                  # (N, W) centred
        uu = u[:, None, :].expand(-1, W, -1)                                 # x varies along cols
        vv = u[:, :, None].expand(-1, -1, W)                                 # y along rows
        pts = torch.stack([uu, vv], -1)                                      # (N, W, W, 2)
        ang = pts[..., None] * self.freqs                                    # (N, W, W, 2, nf)
        inv = (4.0 / side)[:, None, None, None].expand(-1, W, W, 1)           # edge softness scale
        feats = torch.cat([pts, inv, ang.sin().flatten(-2), ang.cos().flatten(-2)], -1)
        x = F.gelu(self.inp(feats) + self.shape_emb(shape)[:, None, None, :])
        for lin in self.hidden:
            x = x + F.gelu(lin(x))
        return self.out(x)[..., 0]


def composite(renderer: MaskRenderer, background: torch.Tensor, objects: list[list[tuple]],
              size: int = 64) -> torch.Tensor:
    """background (B, 3) 0..255; objects[b] = [(shape_idx, (r,g,b), x0, y0, side), ...]
    -> images (B, size, size, 3) float 0..255, painted in order."""
    B = background.shape[0]
    canvas = background.float()[:, None, None, :].repeat(1, size, size, 1)
    flat = [(b, o) for b in range(B) for o in objects[b]]
    if not flat:
        return canvas
    dev = background.device
    shape = torch.tensor([o[0] for _, o in flat], device=dev)
    side = torch.tensor([float(o[4]) for _, o in flat], device=dev)
    cov = torch.sigmoid(renderer(shape, side).float())                      # (N, W, W)
    m, W = renderer.MARGIN, renderer.window
    for n, (b, (_, rgb, x0, y0, s)) in enumerate(flat):
        n_px = min(s + 2 * m, W)                             # window extent that belongs to this box
        c = cov[n, :n_px, :n_px]
        gx0, gy0 = x0 - m, y0 - m
        cx0, cy0 = max(0, -gx0), max(0, -gy0)                # clip to the canvas
        cx1, cy1 = min(n_px, size - gx0), min(n_px, size - gy0)
        if cx1 <= cx0 or cy1 <= cy0:
            continue
        c = c[cy0:cy1, cx0:cx1, None]
        region = canvas[b, gy0 + cy0:gy0 + cy1, gx0 + cx0:gx0 + cx1]
        colour = torch.tensor(rgb, dtype=torch.float32, device=dev)
        canvas[b, gy0 + cy0:gy0 + cy1, gx0 + cx0:gx0 + cx1] = region * (1 - c) + colour * c
    return canvas
