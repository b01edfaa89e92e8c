"""pipeline.hf_caps: what a model folder serves, from its JSON files alone (no torch).

The loaded models' declarations are checked against ``describe`` in test_hf_chat.py,
test_hf_embed.py and test_diffusers.py; here the folder layouts and the import hygiene.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.hf_caps import CHAT_PARAMS, describe, kind

CHAT = ("caption", "vqa"), {
    "caption": ("prompts", "max_new_tokens", "temperature", "top_p", "seeds", "n"),
    "vqa": ("max_new_tokens", "temperature", "top_p", "seeds", "n"),
}


def _folder(root: Path, name: str, files: dict[str, object]) -> Path:
    path = root / name
    path.mkdir()
    for file, content in files.items():
        (path / file).write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_kinds_and_declarations(tmp_path: Path) -> None:
    def config(model_type: str, arch: str = "") -> dict[str, object]:
        return {"model_type": model_type, **({"architectures": [arch]} if arch else {})}

    cases = {
        "sd": ({"model_index.json": {"_class_name": "StableDiffusionPipeline"}},
               ("generate",), {"generate": ("num_inference_steps", "guidance_scale", "width", "height")}),
        "clip": ({"config.json": config("clip", "CLIPModel")}, ("embed",), {"embed": ()}),
        "siglip": ({"config.json": config("siglip", "SiglipModel")}, ("embed",), {"embed": ()}),
        "clip-vision-only": ({"config.json": config("clip_vision_model")}, ("caption",), {"caption": ()}),
        "git": ({"config.json": config("git", "GitForCausalLM")}, ("caption",), {"caption": ()}),
        "blip-vqa": ({"config.json": config("blip", "BlipForQuestionAnswering")}, ("vqa",), {"vqa": ()}),
        # fixed-task architectures keep their own handling even with a chat template
        "blip2": ({"config.json": config("blip-2", "Blip2ForConditionalGeneration"),
                   "chat_template.jinja": "{{ messages }}"},
                  ("caption", "vqa"), {"caption": (), "vqa": ()}),
        # the places transformers has kept a chat template over the versions
        "jinja": ({"config.json": config("llava"), "chat_template.jinja": "{{ messages }}"}, *CHAT),
        "json": ({"config.json": config("llava"), "chat_template.json": {"chat_template": "x"}}, *CHAT),
        "processor": ({"config.json": config("idefics3"), "processor_config.json": {"chat_template": "x"}},
                      *CHAT),
        "tokenizer": ({"config.json": config("qwen2_vl"), "tokenizer_config.json": {"chat_template": "x"}},
                      *CHAT),
        "empty-template": ({"config.json": config("llava"), "tokenizer_config.json": {"chat_template": None}},
                           ("caption",), {"caption": ()}),
    }
    for name, (files, tasks, params) in cases.items():
        assert describe(_folder(tmp_path, name, files)) == (tasks, params), name
    assert kind(tmp_path / "jinja") == "chat" and dict(CHAT_PARAMS) == CHAT[1]
    with pytest.raises(ValueError, match="not a model folder"):
        describe(_folder(tmp_path, "nothing", {"README.md": "hi"}))


def test_imports_stay_light() -> None:
    """hf_caps pulls in no torch at all (the control plane may mirror it); the model adapters
    import transformers and diffusers only when a model is loaded."""
    code = (
        "import sys, pipeline.hf_caps; heavy = [m for m in ('torch', 'numpy', 'PIL', 'transformers', "
        "'diffusers', 'loom', 'worker', 'api') if m in sys.modules]; "
        "import pipeline.hf_chat, pipeline.hf_embed, pipeline.diffusion, pipeline.registry; "
        "heavy += [m for m in ('transformers', 'diffusers', 'loom', 'worker', 'api') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
