"""pipeline.hf_embed: CLIP and SigLIP embedders through ``registry.load("hf:...")``.

No hub here: tiny random CLIPModel / SiglipModel built from configs, with offline tokenizers
(a letter-level BPE CLIPTokenizer; a word-level tokenizer for SigLIP), saved with their
processors and loaded by the real loading code.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from tiny_hf import WORDS, clip_tokenizer, image_processor, require, word_tokenizer

transformers: Any = require("transformers")
torch: Any = require("torch")

from pipeline import hf_caps, registry, serving  # noqa: E402
from pipeline.errors import UnsupportedTaskError  # noqa: E402

TEXT_LEN = 16
DIM = 8
VISION = dict(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
              intermediate_size=32)
TOWER = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
             max_position_embeddings=TEXT_LEN)


def build_clip(out: Path) -> Path:
    tok = clip_tokenizer(TEXT_LEN)
    text = dict(TOWER, vocab_size=len(tok), bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig(vision_config=VISION, text_config=text,
                                                           projection_dim=DIM))
    ip = image_processor("CLIPImageProcessor", size={"shortest_edge": 32},
                         crop_size={"height": 32, "width": 32})
    model.save_pretrained(out)
    transformers.CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(out)
    return out


def build_siglip(out: Path) -> Path:
    tok = word_tokenizer(["<pad>", "</s>", "<unk>"], WORDS, pad_token="<pad>", eos_token="</s>",
                         unk_token="<unk>", model_max_length=TEXT_LEN)
    text = dict(TOWER, vocab_size=len(tok), pad_token_id=0, bos_token_id=1, eos_token_id=1,
                projection_size=DIM)
    torch.manual_seed(0)
    # SigLIP projects the image to the vision width and the text to projection_size: equal here
    model = transformers.SiglipModel(transformers.SiglipConfig(vision_config=dict(VISION, hidden_size=DIM),
                                                               text_config=text))
    ip = image_processor("SiglipImageProcessor", size={"height": 32, "width": 32})
    model.save_pretrained(out)
    transformers.SiglipProcessor(image_processor=ip, tokenizer=tok).save_pretrained(out)
    return out


BUILDERS = {"clip": build_clip, "siglip": build_siglip}
ARCHITECTURES = {"clip": "CLIPModel", "siglip": "SiglipModel"}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def embedder(request: pytest.FixtureRequest,
             tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Any]:
    path = BUILDERS[request.param](tmp_path_factory.mktemp("embed") / f"tiny-{request.param}")
    return request.param, path, registry.load("hf:" + str(path), device="cpu")


IMAGES = [Image.new("RGB", (40, 30), "red"), Image.new("RGB", (20, 50), "blue"), Image.new("L", (32, 32), 90)]
TEXTS = ["a red square", "blue", "a green circle on the white square and a red circle"]


def _unit_vectors(vecs: list[np.ndarray], n: int) -> None:
    assert len(vecs) == n
    for v in vecs:
        assert isinstance(v, np.ndarray) and v.dtype == np.float32 and v.shape == (DIM,)
        assert abs(float(np.linalg.norm(v)) - 1.0) < 1e-5


def test_declares_embed_and_describe_agrees(embedder: tuple[str, Path, Any]) -> None:
    arch, path, model = embedder
    info = model.info
    assert info.name == f"hf:{path}" and info.version == "local" and info.device == "cpu"
    assert info.tasks == ("embed",) and dict(info.params) == {"embed": ()}
    assert hf_caps.describe(path) == (info.tasks, dict(info.params))
    assert info.architecture == ARCHITECTURES[arch]
    assert info.weights_sha256 == hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_vectors_are_unit_float32_and_batch_independent(embedder: tuple[str, Path, Any]) -> None:
    _, _, model = embedder
    images = model.embed(IMAGES)
    _unit_vectors(images, 3)
    for vec, im in zip(images, IMAGES, strict=True):
        np.testing.assert_allclose(model.embed([im])[0], vec, atol=1e-5)
    assert not np.allclose(images[0], images[1])
    texts = model.embed_text(TEXTS)
    _unit_vectors(texts, 3)
    for vec, text in zip(texts, TEXTS, strict=True):  # alone, padded differently or not at all
        np.testing.assert_allclose(model.embed_text([text])[0], vec, atol=1e-5)
    assert not np.allclose(texts[0], texts[1])
    assert model.embed([]) == [] and model.embed_text([]) == []
    assert len(serving.run(model, "embed", [IMAGES], {})) == 3


def test_text_and_images_share_the_models_space(embedder: tuple[str, Path, Any]) -> None:
    """Dot products of our vectors are the model's own image-text logits before scale (and bias)."""
    arch, _, model = embedder
    # SigLIP reads texts padded to the full length (as trained); CLIP stops at the end token
    padding = "max_length" if arch == "siglip" else True
    enc = model.tokenizer(TEXTS, padding=padding, truncation=True, max_length=TEXT_LEN, return_tensors="pt")
    pixels = model.image_processor(images=[im.convert("RGB") for im in IMAGES], return_tensors="pt")
    with torch.inference_mode():
        out = model.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                          pixel_values=pixels["pixel_values"])
        logits = out.logits_per_image.numpy()
        scale = model.model.logit_scale.exp().item()
        bias = model.model.logit_bias.item() if arch == "siglip" else 0.0
    cosine = np.stack(model.embed(IMAGES)) @ np.stack(model.embed_text(TEXTS)).T
    np.testing.assert_allclose(cosine * scale + bias, logits, rtol=1e-4, atol=1e-4)


def test_refuses_other_tasks(embedder: tuple[str, Path, Any]) -> None:
    _, _, model = embedder
    for task in ("caption", "vqa", "generate"):
        with pytest.raises(UnsupportedTaskError):
            serving.check_call(model.info, task, {})
    with pytest.raises(UnsupportedTaskError):
        model.caption(IMAGES)
    with pytest.raises(UnsupportedTaskError):
        model.answer(IMAGES, TEXTS)
    with pytest.raises(UnsupportedTaskError):
        model.generate(TEXTS, [0, 1, 2])
