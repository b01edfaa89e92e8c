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

TASKS = ("caption", "vqa", "generate")


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


# Keyword parameters each task's method accepts (pipeline.serving checks calls against it).
PARAMS: dict[str, tuple[str, ...]] = {"caption": ("beams",), "vqa": ("beams",), "generate": ()}


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
                 temperature: float = 1.0, top_p: float = 0.95):
        self.module = module.eval()
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
