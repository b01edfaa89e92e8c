"""pipeline.hf: Hugging Face image-to-text models behind the model seam.

No hub here: tiny random models are built from configs (ViT encoder + GPT-2 decoder
VisionEncoderDecoder; a tiny BLIP VQA), with tokenizers built locally, saved with
save_pretrained and loaded back through the registry's ``hf:`` names.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from tiny_hf import require


transformers: Any = require("transformers")
torch: Any = require("torch")

from pipeline.errors import PipelineError, UnknownModelError, UnsupportedTaskError  # noqa: E402
from pipeline.hf import HFModelError, load_hf, weights_sha256  # noqa: E402

CAPTION_WORDS = ["[PAD]", "[BOS]", "[EOS]", "[UNK]", "a", "red", "blue", "square", "circle", "on", "white"]
VQA_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "what", "colour", "is", "it", "?",
             "red", "blue", "yes", "no"]


def _image_processor(cls_name: str, size: int) -> object:
    # transformers 5 without torchvision: the *Pil variants are the native ones (the plain names
    # fall back to them with a logged notice); older transformers only has the plain names.
    cls = getattr(transformers, f"{cls_name}Pil", None) or getattr(transformers, cls_name)
    return cls(size={"height": size, "width": size})


def _build_caption_model(out: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(CAPTION_WORDS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]"
    )
    enc = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=64,
    )
    dec = transformers.GPT2Config(
        vocab_size=len(CAPTION_WORDS), n_embd=32, n_layer=1, n_head=2, n_positions=64,
        add_cross_attention=True, is_decoder=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    cfg = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = 1, 0, 2
    torch.manual_seed(0)
    model = transformers.VisionEncoderDecoderModel(config=cfg)
    gen = model.generation_config
    gen.decoder_start_token_id, gen.pad_token_id, gen.eos_token_id = 1, 0, 2
    # A random decoder may stop at once; keep it talking so the captions are real words.
    gen.suppress_tokens = [0, 1, 2, 3]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _image_processor("ViTImageProcessor", 32).save_pretrained(out)
    return out


def _build_vqa_model(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text("\n".join(VQA_WORDS) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(out / "vocab.txt"))
    cfg = transformers.BlipConfig(
        text_config=dict(
            vocab_size=len(VQA_WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=64, bos_token_id=5, sep_token_id=3,
            pad_token_id=0, encoder_hidden_size=32,
        ),
        vision_config=dict(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
            num_attention_heads=2, intermediate_size=64,
        ),
        projection_dim=32,
    )
    torch.manual_seed(0)
    transformers.BlipForQuestionAnswering(cfg).save_pretrained(out)
    processor = transformers.BlipProcessor(
        image_processor=_image_processor("BlipImageProcessor", 32), tokenizer=tokenizer
    )
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def caption_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build_caption_model(tmp_path_factory.mktemp("hf") / "tiny-ved")


@pytest.fixture(scope="module")
def vqa_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build_vqa_model(tmp_path_factory.mktemp("hf") / "tiny-blip-vqa")


def _load(path: Path):  # noqa: ANN202
    """Through the registry's hf: delegation when the registry exists, else directly."""
    try:
        from pipeline import registry
    except ImportError:
        return load_hf(str(path), device="cpu")
    return registry.load("hf:" + str(path), device="cpu")


IMAGES = [Image.new("RGB", (40, 30), "red"), Image.new("RGB", (20, 50), "blue")]


def test_caption_through_the_registry(caption_dir: Path) -> None:
    model = _load(caption_dir)
    info = model.info
    assert info.name == f"hf:{caption_dir}"
    assert info.version == "local"
    assert info.tasks == ("caption",)
    assert info.device == "cpu"
    assert info.architecture == "VisionEncoderDecoderModel"
    assert info.weights_sha256 == hashlib.sha256((caption_dir / "model.safetensors").read_bytes()).hexdigest()

    captions = model.caption(IMAGES)
    assert len(captions) == 2
    assert all(isinstance(c, str) and c for c in captions)
    assert all(set(c.split()) <= set(CAPTION_WORDS[4:]) for c in captions), captions
    assert model.caption(IMAGES) == captions  # greedy: deterministic
    assert model.caption([IMAGES[1].convert("L")]) == captions[1:]  # non-RGB input converted
    assert model.caption([]) == []

    with pytest.raises(UnsupportedTaskError):
        model.answer(IMAGES, ["what colour is it?", "is it red?"])
    with pytest.raises(UnsupportedTaskError):
        model.generate(["a red square"], [0])


def test_blip_vqa(vqa_dir: Path) -> None:
    model = load_hf(str(vqa_dir), device="cpu")
    assert model.info.tasks == ("vqa",)
    assert model.info.architecture == "BlipForQuestionAnswering"
    answers = model.answer(IMAGES, ["what colour is it?", "is it red?"])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert model.answer(IMAGES, ["what colour is it?", "is it red?"]) == answers
    with pytest.raises(ValueError, match="2 images but 1 questions"):
        model.answer(IMAGES, ["?"])
    with pytest.raises(UnsupportedTaskError):  # BlipForQuestionAnswering cannot caption
        model.caption(IMAGES)


def test_missing_directory_is_an_unknown_model(tmp_path: Path) -> None:
    for bad in (str(tmp_path / "nope"), "./does/not/exist", "a/b/c"):
        with pytest.raises(HFModelError, match="no such model directory") as ei:
            load_hf(bad, device="cpu")
        assert isinstance(ei.value, UnknownModelError) and isinstance(ei.value, PipelineError)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnknownModelError, match="not a Hugging Face model directory"):
        load_hf(str(tmp_path / "empty"), device="cpu")


def test_weights_sha256(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"one")
    (tmp_path / "pytorch_model.bin").write_bytes(b"ignored: safetensors present")
    assert weights_sha256(tmp_path) == hashlib.sha256(b"one").hexdigest()
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"two")
    manifest = (
        f"{hashlib.sha256(b'two').hexdigest()}  model-00002-of-00002.safetensors\n"
        f"{hashlib.sha256(b'one').hexdigest()}  model.safetensors\n"
    )
    assert weights_sha256(tmp_path) == hashlib.sha256(manifest.encode()).hexdigest()
    with pytest.raises(UnknownModelError, match="no weight files"):
        weights_sha256(tmp_path / "nothing")


def test_hf_module_imports_transformers_lazily() -> None:
    code = (
        "import sys, pipeline.hf; "
        "bad = [m for m in ('transformers', 'loom', 'worker', 'api') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
