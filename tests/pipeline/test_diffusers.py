"""pipeline.diffusion: a diffusers text-to-image pipeline through ``registry.load("diffusers:...")``.

No hub here: a tiny Stable Diffusion pipeline (UNet2DConditionModel + AutoencoderKL +
CLIPTextModel + a letter-level CLIPTokenizer + DDIM) is built from configs with random
weights, saved with save_pretrained and loaded back by the real loading code.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from tiny_hf import clip_tokenizer, require

transformers: Any = require("transformers")
torch: Any = require("torch")
diffusers: Any = require("diffusers")

from pipeline import hf_caps, registry, serving  # noqa: E402
from pipeline.errors import UnknownModelError, UnsupportedParamError, UnsupportedTaskError  # noqa: E402
from pipeline.hf import HFModelError  # noqa: E402

STEPS = {"num_inference_steps": 2}


def build_sd(out: Path) -> Path:
    torch.manual_seed(0)
    tok = clip_tokenizer(16)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=2,
        norm_num_groups=4)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
        latent_channels=4, norm_num_groups=4, sample_size=16)
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def sd(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    path = build_sd(tmp_path_factory.mktemp("diffusers") / "tiny-sd")
    return path, registry.load("diffusers:" + str(path), device="cpu")


PROMPTS = ["a red square", "a blue circle on a white square", "green"]


def _bytes(images: list[Any]) -> list[bytes]:
    return [im.tobytes() for im in images]


def test_declares_generate_and_describe_agrees(sd: tuple[Path, Any]) -> None:
    path, model = sd
    info = model.info
    assert info.name == f"diffusers:{path}" and info.version == "local" and info.device == "cpu"
    assert info.tasks == ("generate",)
    assert dict(info.params) == {"generate": ("num_inference_steps", "guidance_scale", "width", "height")}
    assert hf_caps.describe(path) == (info.tasks, dict(info.params))
    assert info.architecture == "StableDiffusionPipeline"
    assert model.pipe.safety_checker is None
    files = sorted(path.rglob("*.safetensors"))
    assert {f.parent.name for f in files} == {"unet", "vae", "text_encoder"}
    manifest = "".join(f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.relative_to(path).as_posix()}\n"
                       for f in files)
    assert info.weights_sha256 == hashlib.sha256(manifest.encode()).hexdigest()


def test_same_seed_same_bytes_whatever_the_batch(sd: tuple[Path, Any]) -> None:
    _, model = sd
    images = model.generate(PROMPTS, [1, 2, 3], **STEPS)
    assert [(im.mode, im.size) for im in images] == [("RGB", (16, 16))] * 3
    assert _bytes(model.generate(PROMPTS, [1, 2, 3], **STEPS)) == _bytes(images)
    alone = [model.generate([p], [s], **STEPS)[0] for p, s in zip(PROMPTS, (1, 2, 3), strict=True)]
    assert _bytes(alone) == _bytes(images)
    mixed = model.generate([PROMPTS[2], "other", PROMPTS[0]], [3, 9, 1], **STEPS)
    assert _bytes([mixed[2], mixed[0]]) == _bytes([images[0], images[2]])
    assert _bytes(model.generate(PROMPTS, [4, 5, 6], **STEPS)) != _bytes(images)
    # the seed decides, not the position: one prompt under two seeds differs
    twice = model.generate([PROMPTS[0]] * 2, [1, 7], **STEPS)
    assert twice[0].tobytes() == images[0].tobytes() != twice[1].tobytes()
    assert model.generate([], []) == []
    assert len(serving.run(model, "generate", [PROMPTS, [1, 2, 3]], STEPS)) == 3


def test_params_reach_the_pipeline(sd: tuple[Path, Any]) -> None:
    _, model = sd
    base = model.generate(PROMPTS[:1], [1], **STEPS)[0]
    wide = model.generate(PROMPTS[:1], [1], width=32, height=16, **STEPS)[0]
    assert wide.size == (32, 16)
    assert model.generate(PROMPTS[:1], [1], num_inference_steps=3)[0].tobytes() != base.tobytes()
    assert model.generate(PROMPTS[:1], [1], guidance_scale=1.0, **STEPS)[0].tobytes() != base.tobytes()
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        model.generate(PROMPTS[:2], [1])


def test_refuses_other_tasks_and_params(sd: tuple[Path, Any]) -> None:
    _, model = sd
    for task in ("caption", "vqa", "embed"):
        with pytest.raises(UnsupportedTaskError):
            serving.check_call(model.info, task, {})
    with pytest.raises(UnsupportedParamError, match="temperature"):
        serving.check_call(model.info, "generate", {"temperature": 1.0})
    serving.check_call(model.info, "generate", {"num_inference_steps": 2, "guidance_scale": 3.0,
                                                "width": 16, "height": 16})
    with pytest.raises(UnsupportedTaskError):
        model.caption([])
    with pytest.raises(UnsupportedTaskError):
        model.answer([], [])


def test_wrong_folders_are_unknown_models(sd: tuple[Path, Any], tmp_path: Path) -> None:
    path, _ = sd
    with pytest.raises(HFModelError, match=f"load it as diffusers:{path}"):
        registry.load("hf:" + str(path), device="cpu")
    with pytest.raises(UnknownModelError, match="no model_index.json"):
        registry.load("diffusers:" + str(path / "unet"), device="cpu")
    with pytest.raises(UnknownModelError, match="no such pipeline directory"):
        registry.load("diffusers:" + str(tmp_path / "nope"), device="cpu")
