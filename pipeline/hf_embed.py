"""Dual-tower embedders behind the model seam: CLIP (``CLIPModel``) and SigLIP (``SiglipModel``).
``pipeline.hf.load_hf`` builds it; this module never imports transformers itself.

    model.embed(images)    -> list[np.ndarray]   # image tower: float32, unit L2 norm, shape (d,)
    model.embed_text(texts) -> list[np.ndarray]  # text tower, same space (``loom search``)

Both are the model's projected features, L2-normalised, so a dot product is the cosine the
model was trained on (CLIP's logits and SigLIP's before its scale and bias).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.errors import UnsupportedTaskError

# The text tower's inputs (tokenizers may also return e.g. token_type_ids).
_TEXT_INPUTS = ("input_ids", "attention_mask", "position_ids")


def _features(out: Any) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected features;
    # 4.x returns the tensor itself.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class HFEmbedder:
    """Serving wrapper: batched, in memory, no I/O. Weights in the dtype they were loaded in."""

    def __init__(self, model: Any, processor: Any, info: Any) -> None:
        self.model = model.eval()
        self.info = info
        self.device = torch.device(info.device)
        self.image_processor = processor.image_processor
        self.tokenizer = processor.tokenizer
        length = int(model.config.text_config.max_position_embeddings)
        if model.config.model_type == "siglip":
            # SigLIP was trained on texts padded to the full length and pools the last position:
            # shorter padding gives other (worse) vectors.
            self._text_kwargs: dict[str, Any] = {"padding": "max_length", "max_length": length}
        else:
            self._text_kwargs = {"padding": True, "max_length": length}

    @torch.inference_mode()
    def embed(self, images: Sequence[Image.Image]) -> list[np.ndarray]:
        """One unit-norm float32 vector per image (cosine = dot product)."""
        if not images:
            return []
        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        pixels = self.image_processor(images=rgb, return_tensors="pt")["pixel_values"]
        out = self.model.get_image_features(pixel_values=pixels.to(self.device, dtype=self.model.dtype))
        return self._unit(_features(out))

    @torch.inference_mode()
    def embed_text(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Query vectors in the image vectors' space (``loom search``)."""
        if not texts:
            return []
        enc = self.tokenizer(list(texts), truncation=True, return_tensors="pt", **self._text_kwargs)
        inputs = {k: v.to(self.device) for k, v in enc.items() if k in _TEXT_INPUTS}
        out = self.model.get_text_features(**inputs)
        return self._unit(_features(out))

    @staticmethod
    def _unit(x: torch.Tensor) -> list[np.ndarray]:
        return list(F.normalize(x.float(), dim=-1).cpu().numpy().astype(np.float32))

    def caption(self, images: Sequence[Image.Image], **params: Any) -> list[str]:
        raise UnsupportedTaskError(f"{self.info.name} is an embedding model; it cannot caption")

    def answer(self, images: Sequence[Image.Image], questions: Sequence[str], **params: Any) -> list[str]:
        raise UnsupportedTaskError(f"{self.info.name} is an embedding model; it does not answer questions")

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], **params: Any) -> list[Image.Image]:
        raise UnsupportedTaskError(f"{self.info.name} is an embedding model; it cannot generate images")
