"""The composed model (encode -> fuse -> decode) and its serving wrapper (the worker's seam)."""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from pipeline.config import ModelConfig
from pipeline.data import SHAPES
from pipeline.decode import MaskRenderer, TextDecoder, beam_search, composite, greedy, sample
from pipeline.encode import ImageEncoder, TextEncoder
from pipeline.fuse import Fusion
from pipeline.preprocess import batch_array
from pipeline.tokenizer import Tokenizer

TASKS = ("caption", "vqa", "generate", "embed")


class LoomShapesModel(nn.Module):
    def __init__(self, cfg: ModelConfig, numeric_start: int):
        super().__init__()
        self.cfg = cfg
        self.image_encoder = ImageEncoder(cfg)
        self.text_encoder = TextEncoder(cfg)
        self.fusion = Fusion(cfg)
        self.decoder = TextDecoder(cfg, numeric_start)
        self.renderer = MaskRenderer(cfg)
        # training-only dense probe on the image grid: for the cell holding an object's centre,
        # predict objectness, shape, colour, size and its role in the caption (single, first or
        # second of "left of" / "above"). Dense targets make the encoder learn objects and their
        # relation far sooner than the decoder's cross-attention alone (it stalled at chance on
        # left-of vs above without the role target).
        self.aux_head = nn.Linear(cfg.d_model, 1 + cfg.n_shapes + 6 + 2 + 5)

    def context(self, img_tokens: torch.Tensor | None, text_ids: torch.Tensor,
                text_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fusion(img_tokens, self.text_encoder(text_ids, text_valid), text_valid)

    def seq_loss(self, z: torch.Tensor, z_valid: torch.Tensor, dec_in: torch.Tensor,
                 dec_out: torch.Tensor, pad: int) -> torch.Tensor:
        logits = self.decoder(dec_in, z, z_valid)                         # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), dec_out.flatten(), ignore_index=pad)

    def losses(self, b: dict[str, torch.Tensor], pad: int) -> dict[str, torch.Tensor]:
        """One mixed batch: the same images serve caption and vqa (encoded once)."""
        img = self.image_encoder(b["pixels"])                             # (B, 64, d)
        aux = self.aux_head(img).float()                                   # (B, 64, 12)
        ns = self.cfg.n_shapes
        aux_loss = F.binary_cross_entropy_with_logits(aux[..., 0], b["aux_obj"])
        for lo, hi, key in ((1, 1 + ns, "aux_shape"), (1 + ns, 7 + ns, "aux_colour"), (7 + ns, 9 + ns, "aux_size"),
                            (9 + ns, 14 + ns, "aux_role")):
            aux_loss = aux_loss + F.cross_entropy(aux[..., lo:hi].flatten(0, 1), b[key].flatten(), ignore_index=-100)
        out = {
            "aux": 0.5 * aux_loss,
            "caption": self.seq_loss(*self.context(img, b["cap_text"], b["cap_text"] != pad),
                                     b["cap_in"], b["cap_out"], pad),
            "vqa": self.seq_loss(*self.context(img, b["vqa_text"], b["vqa_text"] != pad),
                                 b["vqa_in"], b["vqa_out"], pad),
            "generate": self.seq_loss(*self.context(None, b["gen_text"], b["gen_text"] != pad),
                                      b["gen_in"], b["gen_out"], pad),
        }
        logits = self.renderer(b["r_shape"], b["r_side"])
        out["render"] = F.binary_cross_entropy_with_logits(logits.float(), b["r_target"])
        return out


class EmbedHead(nn.Module):
    """Projection head for ``embed`` / ``loom search`` on the frozen backbone
    (pipeline/train_embed.py trains it).

    Image vector = [sqrt(w) * unit(sem) ; sqrt(1 - w) * unit(geo)]: ``sem`` attention-pools the
    fused image tokens (what the caption says), ``geo`` keeps where things are (narrow per-token
    features flattened in grid order), so a scene moved by a few pixels is a different image.
    Text vector = [unit(sem_text) ; 0]: a query is ranked by the semantic half only, so the
    position half never disturbs text-to-image ranking. Small on purpose: it trains on CPU."""

    def __init__(self, d: int = 128, n_tokens: int = 64, half: int = 64, queries: int = 8,
                 token_dim: int = 8, sem_weight: float = 0.5):
        super().__init__()
        self.half, self.sem_weight = half, sem_weight
        self.img_score = nn.Linear(d, queries)
        self.img_sem = nn.Sequential(nn.Linear(queries * d, 256), nn.GELU(), nn.Linear(256, half))
        self.geo_tok = nn.Linear(d, token_dim)
        self.img_geo = nn.Sequential(nn.Linear(n_tokens * token_dim, 256), nn.GELU(),
                                     nn.Linear(256, half))
        self.txt_score = nn.Linear(d, queries)
        self.txt_sem = nn.Sequential(nn.Linear(queries * d, 256), nn.GELU(), nn.Linear(256, half))

    @staticmethod
    def _pool(score: nn.Linear, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        # softmax attention pooling, one learned scorer per query: (B, S, d) -> (B, Q * d)
        s = score(x)
        if valid is not None:
            s = s.masked_fill(~valid[..., None], float("-inf"))
        return torch.einsum("bsq,bsd->bqd", s.softmax(1), x).flatten(1)

    def image_parts(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused image tokens (B, N, d) -> unit sem (B, half), unit geo (B, half)."""
        x = tokens.float()
        sem = self.img_sem(self._pool(self.img_score, x))
        geo = self.img_geo(F.gelu(self.geo_tok(x)).flatten(1))
        return F.normalize(sem, dim=-1), F.normalize(geo, dim=-1)

    def combine(self, sem: torch.Tensor, geo: torch.Tensor) -> torch.Tensor:
        return torch.cat([sem * self.sem_weight ** 0.5, geo * (1 - self.sem_weight) ** 0.5], -1)

    def image(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.combine(*self.image_parts(tokens))

    def text_sem(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Text encoder output (B, L, d) + valid mask -> unit sem (B, half)."""
        pooled = self._pool(self.txt_score, tokens.float(), valid)
        return F.normalize(self.txt_sem(pooled), dim=-1)

    def text(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        sem = self.text_sem(tokens, valid)
        return torch.cat([sem, torch.zeros_like(sem)], -1)


def load_embed_head(path: str, device: str = "cpu") -> EmbedHead:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    head = EmbedHead(**{k: (float(v) if k == "sem_weight" else int(v)) for k, v in meta.items()
                        if k in ("d", "n_tokens", "half", "queries", "token_dim", "sem_weight")})
    head.load_state_dict(load_file(str(path)))
    return head.to(device).eval()


# Keyword parameters each task's method accepts (pipeline.serving checks calls against it).
PARAMS: dict[str, tuple[str, ...]] = {"caption": ("beams",), "vqa": ("beams",), "generate": (),
                                      "embed": ()}


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    weights_sha256: str
    tasks: tuple[str, ...]
    parameters: int
    device: str
    params: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(PARAMS))


def text_batch(tok: Tokenizer, texts: list[list[str] | str], task: str, max_len: int,
               device: torch.device) -> torch.Tensor:
    """Texts -> (B, L) ids, each prefixed with its task token, padded with <pad>."""
    rows = [[tok.index[f"<{task}>"]] + tok.encode(t)[: max_len - 1] for t in texts]
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), tok.pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    return ids.to(device)


def parse_layout(tok: Tokenizer, ids: list[int]) -> tuple[tuple[int, int, int], list[tuple]]:
    """Layout tokens -> background rgb and [(shape_idx, rgb, x0, y0, side)], undoing the //4
    colour quantisation by taking the bin centre. A malformed tail is dropped."""
    words = []
    for i in ids:
        if i == tok.eos_id:
            break
        words.append(tok.tokens[i])

    def num(w: str) -> int | None:
        v = tok.numeric_value(tok.index.get(w, -1))
        return v

    def colour(vals: list[int]) -> tuple[int, int, int]:
        return tuple(min(255, v * 4 + 2) for v in vals)  # type: ignore[return-value]

    bg_vals = [num(w) for w in words[:3]]
    bg = colour(bg_vals) if len(bg_vals) == 3 and None not in bg_vals else (255, 255, 255)
    objs = []
    for k in range(3, len(words) - 6, 7):
        shape, vals = words[k], [num(w) for w in words[k + 1:k + 7]]
        if shape not in SHAPES or None in vals:
            break
        r, g, b_, x0, y0, side = vals  # type: ignore[misc]
        if side < 1:
            break
        objs.append((SHAPES.index(shape), colour([r, g, b_]), x0, y0, side))
    return bg, objs


class ShapesModel:
    """Serving wrapper: batched, in memory, no I/O. cuda -> bf16 autocast, cpu -> fp32."""

    def __init__(self, module: LoomShapesModel, tok: Tokenizer, info: ModelInfo,
                 temperature: float = 1.0, top_p: float = 0.95,
                 embed_head: EmbedHead | None = None):
        self.module = module.eval()
        self.embed_head = embed_head
        self.tok = tok
        self.info = info
        self.device = torch.device(info.device)
        self.temperature = temperature
        self.top_p = top_p
        self.autocast_cpu = False        # tests flip this to exercise the bf16 path without a GPU

    def _ctx(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda" or self.autocast_cpu:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _pixels(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.from_numpy(batch_array(images, self.module.cfg.image_size)).to(self.device)

    def _decode_text(self, img_tokens: torch.Tensor, task: str, texts: list[str], beams: int) -> list[str]:
        cfg, tok = self.module.cfg, self.tok
        ids = text_batch(tok, texts, task, cfg.max_text_len, self.device)
        z, zv = self.module.context(img_tokens, ids, ids != tok.pad_id)
        if beams > 1:
            out = beam_search(self.module.decoder, z, zv, tok.bos_id, tok.eos_id, beams)
        else:
            out = greedy(self.module.decoder, z, zv, tok.bos_id, tok.eos_id)
        return [tok.decode(row) for row in out.tolist()]

    def unknown_words(self, text: str) -> list[str]:
        return self.tok.unknown_words(text)

    def vocabulary(self) -> list[str]:
        return sorted(self.tok.word_vocabulary())

    @torch.inference_mode()
    def caption(self, images: list[Image.Image], beams: int = 1) -> list[str]:
        if not images:
            return []
        with self._ctx():
            img = self.module.image_encoder(self._pixels(images))
            return self._decode_text(img, "caption", [""] * len(images), beams)

    @torch.inference_mode()
    def answer(self, images: list[Image.Image], questions: list[str], beams: int = 1) -> list[str]:
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        if not images:
            return []
        with self._ctx():
            img = self.module.image_encoder(self._pixels(images))
            return self._decode_text(img, "vqa", questions, beams)

    @torch.inference_mode()
    def layouts(self, prompts: list[str], seeds: list[int]) -> list[tuple]:
        """Sampled scene layouts (background, objects) for each prompt/seed."""
        tok, cfg = self.tok, self.module.cfg
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        with self._ctx():
            ids = text_batch(tok, prompts, "generate", cfg.max_text_len, self.device)
            z, zv = self.module.context(None, ids, ids != tok.pad_id)
            out = sample(self.module.decoder, z, zv, tok.bos_id, tok.eos_id, gens,
                         self.temperature, self.top_p)
        return [parse_layout(tok, row) for row in out.tolist()]

    @torch.inference_mode()
    def generate(self, prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        if not prompts:
            return []
        lays = self.layouts(prompts, seeds)
        bg = torch.tensor([l[0] for l in lays], dtype=torch.float32, device=self.device)
        # the renderer runs in fp32 even on cuda: masks are tiny and edges need the precision
        imgs = composite(self.module.renderer, bg, [l[1] for l in lays], self.module.cfg.image_size)
        arr = imgs.round().clamp(0, 255).to(torch.uint8).cpu().numpy()
        return [Image.fromarray(np.ascontiguousarray(a), "RGB") for a in arr]

    # --- embed: fixed-size vectors (image side) and queries in the same space (text side) ---

    def fused_tokens(self, images: list[Image.Image]) -> torch.Tensor:
        """The fused image tokens (B, N, d) of the caption path: the image part of z."""
        img = self.module.image_encoder(self._pixels(images))
        ids = text_batch(self.tok, [""] * len(images), "caption", self.module.cfg.max_text_len,
                         self.device)
        z, _ = self.module.context(img, ids, ids != self.tok.pad_id)
        return z[:, : img.shape[1]]

    def text_tokens(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Text encoder output (B, L, d) and its valid mask, read as a generate prompt."""
        ids = text_batch(self.tok, texts, "generate", self.module.cfg.max_text_len, self.device)
        valid = ids != self.tok.pad_id
        return self.module.text_encoder(ids, valid), valid

    def _head(self) -> EmbedHead:
        if self.embed_head is None:
            raise RuntimeError(f"{self.info.name} has no embedding head")
        return self.embed_head

    @torch.inference_mode()
    def embed(self, images: list[Image.Image]) -> list[np.ndarray]:
        """One unit-norm float32 vector per image (cosine = dot product)."""
        head = self._head()
        if not images:
            return []
        with self._ctx():
            tokens = self.fused_tokens(images)
        vecs = head.image(tokens.float()).cpu().numpy().astype(np.float32)
        return list(vecs)

    @torch.inference_mode()
    def embed_text(self, texts: list[str]) -> list[np.ndarray]:
        """Query vectors in the image vectors' space (``loom search``)."""
        head = self._head()
        if not texts:
            return []
        with self._ctx():
            tokens, valid = self.text_tokens(texts)
        return list(head.text(tokens.float(), valid).cpu().numpy().astype(np.float32))
