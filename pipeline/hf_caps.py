"""What a local model folder serves, read from its JSON files alone (no torch, no transformers).

``describe(path) -> (tasks, params)`` is what ``load_hf`` / ``load_diffusers`` declare in the
loaded model's ``info`` (they call it), so the control plane can mirror it without loading a
model. The folder's kind decides:

- ``model_index.json`` (a diffusers pipeline)        -> generate
- ``config.json`` model_type ``clip`` / ``siglip``    -> embed
- BLIP VQA / BLIP-2 / InstructBLIP architectures      -> their fixed tasks, no params
- a chat template (processor or tokenizer), or an
  architecture in ``BUILTIN_CHAT_TEMPLATES``          -> caption + vqa with prompts and sampling
- anything else (BLIP, GIT, VisionEncoderDecoder ...) -> caption, no params
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

Kind = Literal["diffusers", "embedder", "chat", "captioner"]
Params = dict[str, tuple[str, ...]]

# Architectures (config.architectures[0]) that answer questions instead of captioning.
VQA_ONLY = frozenset({"BlipForQuestionAnswering"})
# Architectures that caption and also answer questions through a text prompt.
CAPTION_AND_VQA = frozenset({"Blip2ForConditionalGeneration", "InstructBlipForConditionalGeneration"})
# config.model_type of the dual-tower models served as embedders.
EMBEDDERS = frozenset({"clip", "siglip"})
# Chat VLMs whose checkpoints ship no chat template (PaliGemma's pt and mix checkpoints): served
# with this one, the image first, then the instruction (PaliGemma's processor adds bos after
# the image tokens and the closing newline). Its instruction is a task prefix: --prompt "caption en".
BUILTIN_CHAT_TEMPLATES = {
    "PaliGemmaForConditionalGeneration": (
        "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
        "{% endif %}{% endfor %}{% for c in m['content'] %}{% if c['type'] == 'text' %}"
        "{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"),
}

SAMPLING = ("max_new_tokens", "temperature", "top_p", "seeds", "n")
CHAT_PARAMS: Params = {"caption": ("prompts", *SAMPLING), "vqa": SAMPLING}
EMBED_PARAMS: Params = {"embed": ()}
GENERATE_PARAMS: Params = {"generate": ("num_inference_steps", "guidance_scale", "width", "height")}


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def has_chat_template(root: Path) -> bool:
    """Where transformers keeps a chat template: its own file (4.43+), the processor's or the
    tokenizer's config (older checkpoints)."""
    if (root / "chat_template.jinja").is_file() or _json(root / "chat_template.json").get("chat_template"):
        return True
    return any(_json(root / name).get("chat_template")
               for name in ("processor_config.json", "tokenizer_config.json"))


def kind(path: str | os.PathLike[str]) -> Kind:
    root = Path(path)
    if (root / "model_index.json").is_file():
        return "diffusers"
    config = _json(root / "config.json")
    if not config:
        raise ValueError(f"{root}: no config.json or model_index.json; not a model folder")
    if config.get("model_type") in EMBEDDERS:
        return "embedder"
    arch = (config.get("architectures") or [""])[0]
    if arch in BUILTIN_CHAT_TEMPLATES or (arch not in VQA_ONLY | CAPTION_AND_VQA
                                          and has_chat_template(root)):
        return "chat"
    return "captioner"


def describe(path: str | os.PathLike[str]) -> tuple[tuple[str, ...], Params]:
    """The tasks a folder's model serves and, per task, the keyword params its method takes."""
    k = kind(path)
    if k == "diffusers":
        return ("generate",), dict(GENERATE_PARAMS)
    if k == "embedder":
        return ("embed",), dict(EMBED_PARAMS)
    if k == "chat":
        return ("caption", "vqa"), dict(CHAT_PARAMS)
    arch = (_json(Path(path) / "config.json").get("architectures") or [""])[0]
    tasks = ("vqa",) if arch in VQA_ONLY else ("caption", "vqa") if arch in CAPTION_AND_VQA else ("caption",)
    return tasks, {t: () for t in tasks}
