"""pipeline.hf_chat: chat VLMs (caption with an instruction, vqa) through ``registry.load("hf:...")``.

No hub here: three architectures are built from configs with random weights and word-level
tokenizers (LLaVA: CLIP vision tower + Llama; Idefics3: its SigLIP-style tower + Llama; Gemma 3:
SigLIP tower + Gemma 3, with token_type_ids), each with a chat template, saved with
save_pretrained and loaded by the real loading code. (Qwen2-VL and SmolVLM processors carry a
video processor that needs torchvision, which this environment's CPU torch does not have.)
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from tiny_hf import (
    GEMMA_SPECIAL,
    GEMMA_TEMPLATE,
    IDEFICS_TEMPLATE,
    LLAVA_SPECIAL,
    LLAVA_TEMPLATE,
    WORDS,
    image_processor,
    require,
    word_tokenizer,
)

transformers: Any = require("transformers")
torch: Any = require("torch")

from pipeline import hf_caps, registry, serving  # noqa: E402
from pipeline.errors import UnsupportedParamError, UnsupportedTaskError  # noqa: E402

# Role words of the templates below are plain words: a random model may say them, and that
# must decode as text.
CHAT_WORDS = [*WORDS, "USER", "ASSISTANT", "User", "Assistant"]
IDEFICS_SPECIAL = [*LLAVA_SPECIAL, "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]


def _llama(vocab_size: int) -> Any:
    return transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


def _save(model: Any, processor: Any, n_special: int, out: Path) -> Path:
    gen = model.generation_config
    gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = 0, 1, 2
    # A random model may stop or emit placeholders at once; keep it saying words.
    gen.suppress_tokens = list(range(n_special))
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_llava(out: Path) -> Path:
    tok = word_tokenizer(LLAVA_SPECIAL, CHAT_WORDS, pad_token="<pad>", bos_token="<s>",
                         eos_token="</s>", unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    vision = transformers.CLIPVisionConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1,
                                           num_attention_heads=2, intermediate_size=32)
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=_llama(len(tok)), image_token_id=4,
                                   vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(cfg)
    ip = image_processor("CLIPImageProcessor", size={"shortest_edge": 16},
                         crop_size={"height": 16, "width": 16})
    processor = transformers.LlavaProcessor(
        image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)
    return _save(model, processor, len(LLAVA_SPECIAL), out)


def build_idefics3(out: Path) -> Path:
    tok = word_tokenizer(IDEFICS_SPECIAL, CHAT_WORDS, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                         unk_token="<unk>", additional_special_tokens=IDEFICS_SPECIAL[4:])
    vision = transformers.Idefics3VisionConfig(image_size=32, patch_size=8, hidden_size=16,
                                               num_hidden_layers=1, num_attention_heads=2,
                                               intermediate_size=32)
    cfg = transformers.Idefics3Config(vision_config=vision, text_config=_llama(len(tok)), image_token_id=4,
                                      scale_factor=2, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.Idefics3ForConditionalGeneration(cfg)
    ip = image_processor("Idefics3ImageProcessor", do_image_splitting=False, size={"longest_edge": 32},
                         max_image_size={"longest_edge": 32})
    # (32 / 8)^2 patches, merged 2x2 by the connector
    processor = transformers.Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4,
                                               chat_template=IDEFICS_TEMPLATE)
    return _save(model, processor, len(IDEFICS_SPECIAL), out)


def build_gemma3(out: Path) -> Path:
    tok = word_tokenizer(GEMMA_SPECIAL, CHAT_WORDS, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                         unk_token="<unk>", extra_special_tokens={
                             "boi_token": "<start_of_image>", "image_token": "<image_soft_token>",
                             "eoi_token": "<end_of_image>"})
    text = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=128,
                sliding_window=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = dict(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=32)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                    boi_token_index=4, image_token_index=5, eoi_token_index=6)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(cfg)
    # Gemma 3 initialises its image projection to zeros: the image would not reach the text model
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.2)
    ip = image_processor("Gemma3ImageProcessor", size={"height": 16, "width": 16})
    processor = transformers.Gemma3Processor(image_processor=ip, tokenizer=tok, chat_template=GEMMA_TEMPLATE,
                                             image_seq_length=4)
    return _save(model, processor, len(GEMMA_SPECIAL), out)


BUILDERS = {"llava": build_llava, "idefics3": build_idefics3, "gemma3": build_gemma3}
ARCHITECTURES = {"llava": "LlavaForConditionalGeneration", "idefics3": "Idefics3ForConditionalGeneration",
                 "gemma3": "Gemma3ForConditionalGeneration"}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def vlm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Any]:
    path = BUILDERS[request.param](tmp_path_factory.mktemp("chat") / f"tiny-{request.param}")
    return request.param, path, registry.load("hf:" + str(path), device="cpu")


IMAGES = [Image.new("RGB", (40, 30), "red"), Image.new("RGB", (20, 50), "blue"),
          Image.new("L", (32, 32), 200)]
# different lengths, so that the batch is padded (on the left)
PROMPTS = ["describe this image .", "what is the colour of the square on the white circle ?", "a red"]
QUESTIONS = ["what colour is it ?", "is it red ?", "is the square on the circle and is it green ?"]


def _words(texts: list[str]) -> set[str]:
    return {w for t in texts for w in t.split()}


def test_declares_tasks_and_params_and_describe_agrees(vlm: tuple[str, Path, Any]) -> None:
    arch, path, model = vlm
    info = model.info
    assert info.name == f"hf:{path}"
    assert info.tasks == ("caption", "vqa")
    assert dict(info.params) == {
        "caption": ("prompts", "max_new_tokens", "temperature", "top_p", "seeds", "n"),
        "vqa": ("max_new_tokens", "temperature", "top_p", "seeds", "n"),
    }
    assert hf_caps.describe(path) == (info.tasks, dict(info.params))
    assert info.architecture == ARCHITECTURES[arch]
    assert info.device == "cpu" and info.version == "local"
    assert info.weights_sha256 == hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    assert isinstance(model, serving.ServingModel) and isinstance(info, serving.ServingInfo)


def test_greedy_batch_equals_one_by_one(vlm: tuple[str, Path, Any]) -> None:
    _, _, model = vlm
    captions = model.caption(IMAGES, PROMPTS, max_new_tokens=5)
    assert captions == [model.caption([im], [p], max_new_tokens=5)[0] for im, p in zip(IMAGES, PROMPTS)]
    assert all(c and len(c.split()) <= 5 for c in captions), captions
    # only new tokens, no special tokens: every word is a vocabulary word (so no prompt echo
    # either: the prompt's "<image>" runs and role markers would show up otherwise)
    assert _words(captions) <= set(CHAT_WORDS), captions
    answers = model.answer(IMAGES, QUESTIONS, max_new_tokens=4)
    assert answers == [model.answer([im], [q], max_new_tokens=4)[0] for im, q in zip(IMAGES, QUESTIONS)]
    assert model.caption(IMAGES, PROMPTS, max_new_tokens=5, temperature=0) == captions
    assert model.caption([], []) == [] and model.answer([], []) == []


def test_prompts_change_the_output_and_default_to_an_instruction(vlm: tuple[str, Path, Any]) -> None:
    _, _, model = vlm
    default = model.caption(IMAGES, max_new_tokens=6)
    assert model.caption(IMAGES, [None, " ", model.default_prompt], max_new_tokens=6) == default
    prompted = model.caption(IMAGES, PROMPTS, max_new_tokens=6)
    assert prompted != default
    # a prompt cannot open an image slot or end the turn: control tokens are taken out
    img, bos, eos = model.processor.image_token, model.tokenizer.bos_token, model.tokenizer.eos_token
    sneaky = [f"{img} describe this image . {eos}",
              f"what is the colour of the {img} square on the white circle ?{eos}", f"a {bos}red{img}"]
    assert model.caption(IMAGES, sneaky, max_new_tokens=6) == prompted


def test_sampling_is_seeded_per_item(vlm: tuple[str, Path, Any]) -> None:
    _, _, model = vlm
    kw = {"max_new_tokens": 8, "temperature": 1.0, "top_p": 0.95}
    state = torch.random.get_rng_state()
    batch = model.caption(IMAGES, PROMPTS, seeds=[1, 2, 3], **kw)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random state is left alone
    assert model.caption(IMAGES, PROMPTS, seeds=[1, 2, 3], **kw) == batch
    # an item's output does not depend on what else is in its batch
    assert [model.caption([im], [p], seeds=[s], **kw)[0]
            for im, p, s in zip(IMAGES, PROMPTS, (1, 2, 3), strict=True)] == batch
    assert model.caption(IMAGES[::-1], PROMPTS[::-1], seeds=[3, 2, 1], **kw) == batch[::-1]
    assert model.caption(IMAGES, PROMPTS, seeds=[4, 5, 6], **kw) != batch
    assert model.caption(IMAGES, PROMPTS, **kw) == model.caption(IMAGES, PROMPTS, seeds=[0, 0, 0], **kw)
    answers = model.answer(IMAGES, QUESTIONS, seeds=[7, 8, 9], **kw)
    assert [model.answer([im], [q], seeds=[s], **kw)[0]
            for im, q, s in zip(IMAGES, QUESTIONS, (7, 8, 9), strict=True)] == answers


def test_n_outputs_per_item(vlm: tuple[str, Path, Any]) -> None:
    _, _, model = vlm
    sampled = model.caption(IMAGES, PROMPTS, seeds=[1, 2, 3], n=3, max_new_tokens=6, temperature=1.0)
    assert [len(s) for s in sampled] == [3, 3, 3]
    assert all(len(set(s)) > 1 for s in sampled), sampled
    assert sampled == model.caption(IMAGES, PROMPTS, seeds=[1, 2, 3], n=3, max_new_tokens=6, temperature=1.0)
    # greedy: the n best beams, distinct, batched like greedy
    beams = model.answer(IMAGES, QUESTIONS, n=2, max_new_tokens=4)
    assert [len(b) for b in beams] == [2, 2, 2] and all(b[0] != b[1] for b in beams), beams
    assert beams == [model.answer([im], [q], n=2, max_new_tokens=4)[0] for im, q in zip(IMAGES, QUESTIONS)]
    one = model.caption(IMAGES, PROMPTS, n=1, max_new_tokens=5)
    assert one == [[c] for c in model.caption(IMAGES, PROMPTS, max_new_tokens=5)]
    # through the seam as the worker calls it: one (nested) output per item
    out = serving.run(model, "caption", [IMAGES, PROMPTS], {"n": 2, "max_new_tokens": 3})
    assert len(out) == 3 and all(len(o) == 2 for o in out)


def test_refuses_other_tasks_params_and_bad_calls(vlm: tuple[str, Path, Any]) -> None:
    _, _, model = vlm
    with pytest.raises(UnsupportedTaskError):
        serving.check_call(model.info, "generate", {})
    with pytest.raises(UnsupportedTaskError):
        serving.check_call(model.info, "embed", {})
    with pytest.raises(UnsupportedTaskError):
        model.generate(["a red square"], [0])
    with pytest.raises(UnsupportedParamError, match="beams"):
        serving.check_call(model.info, "caption", {"beams": 2})
    with pytest.raises(UnsupportedParamError, match="prompts"):
        serving.check_call(model.info, "vqa", {"prompts": ["x"]})
    serving.check_call(model.info, "caption", {"prompts": ["x"], "n": 2, "seeds": [1], "top_p": 0.9})
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        model.caption(IMAGES, PROMPTS[:2])
    with pytest.raises(ValueError, match="3 images but 1 questions"):
        model.answer(IMAGES, QUESTIONS[:1])
    with pytest.raises(ValueError, match="seeds"):
        model.caption(IMAGES, seeds=[1], temperature=1.0)
    with pytest.raises(ValueError, match="n must be"):
        model.caption(IMAGES, n=0)


def test_paligemma_without_a_chat_template_is_served_as_a_chat_vlm(tmp_path: Path) -> None:
    """The Hub's PaliGemma pt/mix checkpoints ship no chat template: hf_caps serves them with
    its own (the image, then the instruction) instead of as a captioner that cannot caption."""
    from tiny_hf_vision import build_paligemma

    path = build_paligemma(tmp_path / "pg", chat_template=False)
    assert not hf_caps.has_chat_template(path) and hf_caps.kind(path) == "chat"
    model = registry.load("hf:" + str(path), device="cpu")
    assert model.info.tasks == ("caption", "vqa")
    images = [Image.new("RGB", (20, 30), "red"), Image.new("RGB", (40, 30), "blue")]
    batch = serving.run(model, "caption", [images], {"prompts": ["caption en", "caption es"],
                                                     "max_new_tokens": 3})
    assert batch == [serving.run(model, "caption", [[im]], {"prompts": [p], "max_new_tokens": 3})[0]
                     for im, p in zip(images, ["caption en", "caption es"], strict=True)]
    assert len(serving.run(model, "answer", [images[:1], ["is it red ?"]],
                           {"max_new_tokens": 2})[0].split()) <= 2
