"""Word-level tokenizer for the shapes world, shipped inside the checkpoint.

One vocabulary serves prompts, questions, captions, answers and layout tokens, so the single
autoregressive decoder can emit words (caption / vqa) or layouts (generate).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
TASK_TOKENS = ("<caption>", "<vqa>", "<generate>")
SPECIALS = (PAD, BOS, EOS, UNK) + TASK_TOKENS

# Every word of the caption grammar, the question templates and the answers.
WORDS = (
    "a", "small", "large", "red", "green", "blue", "yellow", "purple", "orange",
    "circle", "square", "triangle", "to", "the", "left", "of", "above",
    "how", "many", "shapes", "are", "there", "?", "what", "color", "is", "shape",
    "object", "size", "yes", "no", "one", "two",
)

_SPLIT = re.compile(r"[a-z]+|\?|<[a-z]+>|n\d+")
# Spellings a person writes that mean a vocabulary word ("an orange circle", British "colour").
ALIASES = {"an": "a", "colour": "color"}


def numeric_token(value: int) -> str:
    return f"n{value}"


@dataclass
class Tokenizer:
    tokens: list[str]
    n_numeric: int
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.index = {t: i for i, t in enumerate(self.tokens)}

    @classmethod
    def build(cls, n_numeric: int = 64) -> "Tokenizer":
        numeric = [numeric_token(i) for i in range(n_numeric)]
        return cls(list(SPECIALS) + list(WORDS) + numeric, n_numeric)

    # ids of the special tokens, used all over the model code
    @property
    def pad_id(self) -> int:
        return self.index[PAD]

    @property
    def bos_id(self) -> int:
        return self.index[BOS]

    @property
    def eos_id(self) -> int:
        return self.index[EOS]

    @property
    def numeric_start(self) -> int:
        return self.index[numeric_token(0)]

    def __len__(self) -> int:
        return len(self.tokens)

    def split(self, text: str) -> list[str]:
        return [ALIASES.get(w, w) for w in _SPLIT.findall(text.lower())]

    def encode(self, text: str | list[str]) -> list[int]:
        words = self.split(text) if isinstance(text, str) else text
        unk = self.index[UNK]
        return [self.index.get(w, unk) for w in words]

    def unknown_words(self, text: str) -> list[str]:
        """Words of ``text`` outside the vocabulary (in order, once each): the model would read
        each as <unk> and answer or draw something unrelated. Specials and layout tokens typed
        into a prompt count as unknown too; so does text with no word at all."""
        words = self.split(text)
        if not words:
            return [w for w in dict.fromkeys(text.split())]
        vocab = self.word_vocabulary()
        return [w for w in dict.fromkeys(words) if w not in vocab]

    def word_vocabulary(self) -> frozenset[str]:
        """The plain words a prompt or question may use (no specials, no layout numbers)."""
        start, end = self.numeric_start, self.numeric_start + self.n_numeric
        return frozenset(t for i, t in enumerate(self.tokens)
                         if t not in SPECIALS and not start <= i < end)

    def decode(self, ids: list[int]) -> str:
        """Ids -> words, stopping at <eos>; specials dropped, '?' glued to its word."""
        out: list[str] = []
        for i in ids:
            if i == self.eos_id:
                break
            tok = self.tokens[i]
            if tok in SPECIALS:
                continue
            out.append(tok)
        return " ".join(out).replace(" ?", "?")

    def numeric_value(self, token_id: int) -> int | None:
        v = token_id - self.numeric_start
        return v if 0 <= v < self.n_numeric else None

    def to_json(self) -> str:
        return json.dumps({"tokens": self.tokens, "n_numeric": self.n_numeric})

    @classmethod
    def from_json(cls, text: str) -> "Tokenizer":
        raw = json.loads(text)
        return cls(list(raw["tokens"]), int(raw["n_numeric"]))
