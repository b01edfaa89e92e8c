"""Chat VLMs behind the model seam: any ``AutoModelForImageTextToText`` whose processor has a chat
template (LLaVA, Idefics3/SmolVLM, Qwen2-VL, Gemma 3, PaliGemma ...). ``pipeline.hf.load_hf``
builds it; this module never imports transformers itself (it uses the objects it is given).

    model.caption(images, prompts=None, *, max_new_tokens=None, temperature=None, top_p=None,
                  seeds=None, n=None)                       -> list[str] | list[list[str]]
    model.answer(images, questions, *, max_new_tokens=None, temperature=None, top_p=None,
                 seeds=None, n=None)                        -> list[str] | list[list[str]]

Each item is one user turn: its image, then its instruction (caption; ``prompts`` absent or an
item's prompt None or blank -> ``DEFAULT_PROMPT``) or its question (vqa). Greedy decoding
(temperature 0 or None) runs the batch at once, left-padded; sampling runs each item alone
under its own seed (``seeds[i]``, 0 when absent), so an item's output never depends on the
other items of its batch. ``n`` asks for n outputs per item and then the method returns n
strings per item: n samples when sampling, the n best beams of a beam search when greedy.
Only the newly generated tokens are decoded, without special tokens and surrounding space.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from pipeline.errors import UnsupportedTaskError

DEFAULT_PROMPT = "Describe this image."
DEFAULT_MAX_NEW_TOKENS = 128


def _control_tokens(processor: Any, tokenizer: Any) -> tuple[str, ...]:
    """Strings that mean structure, not text, to this model: special tokens and the processor's
    media placeholders. A user's prompt must not open an image slot or close the turn."""
    found = {str(t) for t in getattr(tokenizer, "all_special_tokens", ())}
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    found.update(t.content for t in added.values() if getattr(t, "special", False))
    for attr in ("image_token", "video_token", "audio_token", "boi_token", "eoi_token"):
        value = getattr(processor, attr, None)
        if isinstance(value, str):
            found.add(value)
    # longest first, so that a token containing another is removed whole
    return tuple(sorted((t for t in found if t.strip()), key=len, reverse=True))


class HFChatVLM:
    """Serving wrapper: batched, in memory, no I/O. Weights in the dtype they were loaded in."""

    def __init__(self, model: Any, processor: Any, info: Any, *,
                 max_new_tokens: int | None = None, default_prompt: str = DEFAULT_PROMPT) -> None:
        self.model = model.eval()
        self.processor = processor
        self.info = info
        self.device = torch.device(info.device)
        self.max_new_tokens = max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        self.default_prompt = default_prompt
        self.tokenizer = processor.tokenizer
        # Decoder-only generation appends to the right end of every row: pad on the left.
        self.tokenizer.padding_side = "left"
        self.chat_template = getattr(processor, "chat_template", None) or self.tokenizer.chat_template
        self._control = _control_tokens(processor, self.tokenizer)
        # transformers 5 takes the processor's own kwargs in a dict; 4.x takes them directly.
        takes_dict = "processor_kwargs" in inspect.signature(processor.apply_chat_template).parameters
        self._template_kwargs: dict[str, Any] = (
            {"processor_kwargs": {"padding": True}} if takes_dict else {"padding": True})

    # --- the seam ---------------------------------------------------------------------------

    @torch.inference_mode()
    def caption(self, images: Sequence[Image.Image], prompts: Sequence[str | None] | None = None, *,
                max_new_tokens: int | None = None, temperature: float | None = None,
                top_p: float | None = None, seeds: Sequence[int] | None = None,
                n: int | None = None) -> list[str] | list[list[str]]:
        if prompts is None:
            prompts = [None] * len(images)
        texts = [p if p and p.strip() else self.default_prompt for p in prompts]
        return self._chat(images, texts, "prompts", max_new_tokens=max_new_tokens,
                          temperature=temperature, top_p=top_p, seeds=seeds, n=n)

    @torch.inference_mode()
    def answer(self, images: Sequence[Image.Image], questions: Sequence[str], *,
               max_new_tokens: int | None = None, temperature: float | None = None,
               top_p: float | None = None, seeds: Sequence[int] | None = None,
               n: int | None = None) -> list[str] | list[list[str]]:
        return self._chat(images, list(questions), "questions", max_new_tokens=max_new_tokens,
                          temperature=temperature, top_p=top_p, seeds=seeds, n=n)

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], **params: Any) -> list[Image.Image]:
        raise UnsupportedTaskError(f"{self.info.name} is a vision-language model; it cannot generate images")

    # --- decoding ---------------------------------------------------------------------------

    def _chat(self, images: Sequence[Image.Image], texts: list[str], what: str, *,
              max_new_tokens: int | None, temperature: float | None, top_p: float | None,
              seeds: Sequence[int] | None, n: int | None) -> list[str] | list[list[str]]:
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} {what}")
        if seeds is not None and len(seeds) != len(images):
            raise ValueError(f"{len(images)} images but {len(seeds)} seeds")
        count = 1 if n is None else int(n)
        if count < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if temperature is not None and temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not images:
            return []
        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        texts = [self._clean(t) for t in texts]
        config = self._generation_config(max_new_tokens, temperature, top_p, count)
        if config.do_sample:
            flat: list[str] = []
            for i, (im, text) in enumerate(zip(rgb, texts, strict=True)):
                flat += self._seeded(int(seeds[i]) if seeds is not None else 0, [im], [text], config)
        else:
            flat = self._generate(rgb, texts, config)
        grouped = [flat[i * count:(i + 1) * count] for i in range(len(rgb))]
        return grouped if n is not None else [g[0] for g in grouped]

    def _clean(self, text: str) -> str:
        for token in self._control:
            text = text.replace(token, "")
        return text.strip()

    def _generation_config(self, max_new_tokens: int | None, temperature: float | None,
                           top_p: float | None, count: int) -> Any:
        # Start from the checkpoint's config (eos ids, suppressed tokens, repetition penalty) but
        # let the job's params alone decide the decoding strategy: a shipped top_k=1 or
        # temperature must not turn a sampled job greedy or the other way round.
        config = copy.deepcopy(self.model.generation_config)
        config.max_new_tokens = int(max_new_tokens or self.max_new_tokens)
        config.num_return_sequences = count
        config.top_k = None
        if temperature:
            config.do_sample, config.num_beams = True, 1
            config.temperature, config.top_p = float(temperature), 1.0 if top_p is None else float(top_p)
        else:
            config.do_sample, config.num_beams = False, count
            config.temperature = config.top_p = None
        if config.pad_token_id is None:  # else generate() logs that it picked one, on every call
            pad, eos = self.tokenizer.pad_token_id, config.eos_token_id
            config.pad_token_id = pad if pad is not None else eos[0] if isinstance(eos, list) else eos
        return config

    def _seeded(self, seed: int, images: list[Image.Image], texts: list[str], config: Any) -> list[str]:
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        # fork_rng: seeding here must not reset the caller's global random state
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return self._generate(images, texts, config)

    def _generate(self, images: list[Image.Image], texts: list[str], config: Any) -> list[str]:
        conversations = [[{"role": "user", "content": [{"type": "image", "image": im},
                                                       {"type": "text", "text": text}]}]
                         for im, text in zip(images, texts, strict=True)]
        inputs = self.processor.apply_chat_template(
            conversations, chat_template=self.chat_template, add_generation_prompt=True,
            tokenize=True, return_dict=True, return_tensors="pt", **self._template_kwargs)
        # BatchFeature.to casts only the floating tensors (pixels) to the weights' dtype
        inputs = inputs.to(self.device, dtype=self.model.dtype)
        ids = self.model.generate(**inputs, generation_config=config)
        if not getattr(self.model.config, "is_encoder_decoder", False):
            ids = ids[:, inputs["input_ids"].shape[1]:]
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
