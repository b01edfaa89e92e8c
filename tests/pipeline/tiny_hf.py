"""Offline builders for the tiny random-weight Hugging Face models of tests/pipeline (no hub).

Tokenizers are built from a handful of words (a word-level ``tokenizers.Tokenizer`` wrapped in
PreTrainedTokenizerFast, or a letter-level BPE ``CLIPTokenizer``) and saved with the model, so
every test loads its model back through the real ``from_pretrained`` code.
"""

from __future__ import annotations

import importlib
import os
import string
from typing import Any

import pytest


def require(module: str) -> Any:
    """Import ``module``: skip the file locally when it is absent, fail it under CI=true."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(f"{module} is required under CI=true but is not installed", pytrace=False)
        pytest.skip(f"{module} not installed", allow_module_level=True)
    raise AssertionError("unreachable")


WORDS = ["describe", "this", "image", "what", "colour", "is", "it", "a", "red", "blue", "green",
         "square", "circle", "on", "white", "the", "and", ".", "?", ":"]


def image_processor(cls_name: str, **kwargs: Any) -> Any:
    # transformers 5 without torchvision: the *Pil variants are the native ones (the plain names
    # fall back to them with a logged notice); older transformers only has the plain names.
    import transformers

    cls = getattr(transformers, f"{cls_name}Pil", None) or getattr(transformers, cls_name)
    return cls(**kwargs)


def word_tokenizer(special: list[str], words: list[str], **kwargs: Any) -> Any:
    """A word-level fast tokenizer: ``special`` first (ids 0..), then ``words``. Punctuation is
    split off (``Whitespace``); added special tokens are matched before that split."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate([*special, *words])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, **kwargs)


def clip_tokenizer(max_length: int) -> Any:
    """A CLIPTokenizer over single letters (and a few merges): ids 0/1 are start/end of text."""
    import transformers

    letters = list(string.ascii_lowercase)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for piece in [*letters, *(c + "</w>" for c in letters), "re", "red</w>", "bl", "ue</w>"]:
        vocab.setdefault(piece, len(vocab))
    merges = [("r", "e"), ("re", "d</w>"), ("b", "l"), ("u", "e</w>")]
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


# Chat templates and special tokens of the tiny chat VLMs (test_hf_chat.py, tiny_hf_vision.py).
LLAVA_SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
LLAVA_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | upper }}: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
GEMMA_SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<start_of_image>", "<image_soft_token>", "<end_of_image>"]
GEMMA_TEMPLATE = (  # the processor expands <start_of_image> into the image's soft tokens
    "{% for m in messages %}{{ m['role'] | upper }}: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<start_of_image>{% else %}{{ c['text'] }} {% endif %}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
IDEFICS_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
