"""pipeline.hf_chat with the chat VLMs whose processors need torchvision (skipped without it).

Qwen2-VL, Qwen2.5-VL and SmolVLM carry a video processor that only exists with torchvision, and
with torchvision installed every architecture's ``AutoProcessor`` loads the torchvision image
processor instead of the ``*Pil`` one that tests/pipeline/test_hf_chat.py gets. Each model here
is built tiny from a config with random weights (tiny_hf_vision.py), saved with save_pretrained
and loaded by ``registry.load("hf:<folder>")``, the code path of an ``hf:`` model ref; LLaVA is
the control. A spy around the model's ``generate`` records what Loom passed in and the scores
that came out, so that padding is checked on logits, not only on the greedy words.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torchvision")

from PIL import Image  # noqa: E402
from tiny_hf import require  # noqa: E402

transformers: Any = require("transformers")
torch: Any = require("torch")

import tiny_hf_vision as tv  # noqa: E402

from pipeline import hf_caps, registry, serving  # noqa: E402
from pipeline.hf_chat import DEFAULT_MAX_NEW_TOKENS, HFChatVLM  # noqa: E402

# three sizes (the Qwen processors give them 12, 12 and 16 image tokens), one of them grey
IMAGES = [Image.new("RGB", (40, 30), "red"), Image.new("RGB", (20, 50), "blue"),
          Image.new("L", (32, 32), 200)]
# different lengths, so that the batch is padded (on the left)
PROMPTS = ["describe this image .", "what is the colour of the square on the white circle ?", "a red"]
QUESTIONS = ["what colour is it ?", "is it red ?", "is the square on the circle and is it green ?"]

# SmolVLM's processor imports num2words (not a transformers requirement)
NEEDS = {"smolvlm": "num2words"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Spy:
    """Wraps ``model.generate``: records each call's inputs and per-step scores."""

    def __init__(self, model: Any) -> None:
        self.calls: list[dict[str, Any]] = []
        self._generate = model.generate
        model.generate = self

    def __call__(self, *, generation_config: Any, **kwargs: Any) -> Any:
        config = copy.deepcopy(generation_config)
        config.output_scores = config.return_dict_in_generate = True
        out = self._generate(**kwargs, generation_config=config)
        self.calls.append({"inputs": kwargs, "scores": [s.float() for s in out.scores],
                           "sequences": out.sequences})
        return out.sequences

    def take(self) -> list[dict[str, Any]]:
        calls, self.calls = self.calls, []
        return calls


# PaliGemma saved without a chat template (the Hub's pt and mix checkpoints, as far as we know):
# served as a chat VLM with hf_caps.BUILTIN_CHAT_TEMPLATES (it used to be called a captioner whose
# generate(pixel_values=...) had no image tokens to match, and vqa was not declared).
ARCHS = sorted(tv.BUILDERS)


@pytest.fixture(scope="module", params=ARCHS)
def vlm(request: pytest.FixtureRequest,
        tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Any, Spy]:
    arch = request.param
    if arch in NEEDS:
        pytest.importorskip(NEEDS[arch])
    path = tv.BUILDERS[arch](tmp_path_factory.mktemp("vision") / f"tiny-{arch}")
    model = registry.load("hf:" + str(path), device="cpu")
    return arch, path, model, Spy(model.model)


def _words(texts: list[str]) -> set[str]:
    return {w for t in texts for w in t.split()}


def _rows_close(batch_call: dict[str, Any], row: int, alone_call: dict[str, Any]) -> bool:
    """Row ``row`` of a batched call scored every step as the same item alone did."""
    return len(batch_call["scores"]) == len(alone_call["scores"]) and all(
        torch.allclose(b[row], a[0], atol=1e-4, rtol=1e-4)
        for b, a in zip(batch_call["scores"], alone_call["scores"], strict=True))


def test_loads_as_a_chat_vlm_with_torchvision_processors(vlm: tuple[str, Path, Any, Spy]) -> None:
    arch, path, model, _ = vlm
    assert isinstance(model, HFChatVLM)
    info = model.info
    assert info.name == f"hf:{path}" and info.architecture == tv.ARCHITECTURES[arch]
    assert info.tasks == ("caption", "vqa")
    assert dict(info.params) == {
        "caption": ("prompts", "max_new_tokens", "temperature", "top_p", "seeds", "n"),
        "vqa": ("max_new_tokens", "temperature", "top_p", "seeds", "n"),
    }
    assert hf_caps.describe(path) == (info.tasks, dict(info.params))
    assert info.device == "cpu" and info.version == "local"
    assert info.weights_sha256 == hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    assert isinstance(model, serving.ServingModel) and isinstance(info, serving.ServingInfo)
    assert model.max_new_tokens == DEFAULT_MAX_NEW_TOKENS
    # AutoProcessor gave back the torchvision image processor (and video processor), not *Pil
    from transformers.image_processing_backends import TorchvisionBackend

    ip = model.processor.image_processor
    assert type(ip).__name__ == tv.IMAGE_PROCESSORS[arch] and isinstance(ip, TorchvisionBackend)
    if arch in ("qwen2_vl", "qwen2_5_vl", "smolvlm"):
        assert type(model.processor.video_processor).__name__.endswith("VideoProcessor")
    assert model.tokenizer.padding_side == "left"


def test_caption_batch_is_left_padded_and_equals_each_item_alone(vlm: tuple[str, Path, Any, Spy]) -> None:
    _, _, model, spy = vlm
    spy.take()
    captions = model.caption(IMAGES, PROMPTS, max_new_tokens=5)
    [batch] = spy.take()
    mask = batch["inputs"]["attention_mask"]
    lengths = mask.sum(1).tolist()
    assert len(set(lengths)) > 1, lengths  # the rows really differ, so padding is exercised
    for row in mask:  # left padding: zeros only before the first one
        first = int(row.argmax())
        assert row[:first].sum() == 0 and bool(row[first:].all()), mask
    assert batch["sequences"].shape[1] - mask.shape[1] == 5  # max_new_tokens, no early stop
    assert all(len(c.split()) <= 5 and c for c in captions), captions
    # only new tokens, no special tokens, no prompt echo: every word is a vocabulary word
    assert _words(captions) <= set(tv.CHAT_WORDS), captions
    for i, (im, p) in enumerate(zip(IMAGES, PROMPTS, strict=True)):
        assert model.caption([im], [p], max_new_tokens=5) == [captions[i]]
        [alone] = spy.take()
        assert _rows_close(batch, i, alone), f"item {i}: batched scores differ from the item alone"


def test_vqa_with_per_item_questions_equals_each_item_alone(vlm: tuple[str, Path, Any, Spy]) -> None:
    _, _, model, spy = vlm
    spy.take()
    answers = model.answer(IMAGES, QUESTIONS, max_new_tokens=4)
    [batch] = spy.take()
    assert len(answers) == 3 and all(answers) and _words(answers) <= set(tv.CHAT_WORDS), answers
    for i, (im, q) in enumerate(zip(IMAGES, QUESTIONS, strict=True)):
        assert model.answer([im], [q], max_new_tokens=4) == [answers[i]]
        [alone] = spy.take()
        assert _rows_close(batch, i, alone), f"item {i}: batched scores differ from the item alone"
    # the question reaches the model: other questions, other first-step scores
    model.answer(IMAGES, [QUESTIONS[1], QUESTIONS[2], QUESTIONS[0]], max_new_tokens=1)
    [other] = spy.take()
    assert not torch.allclose(other["scores"][0], batch["scores"][0])


def test_greedy_is_repeatable_and_the_image_reaches_the_model(vlm: tuple[str, Path, Any, Spy]) -> None:
    _, _, model, spy = vlm
    spy.take()
    first = model.caption(IMAGES, PROMPTS, max_new_tokens=5)
    assert model.caption(IMAGES, PROMPTS, max_new_tokens=5) == first
    assert model.caption(IMAGES, PROMPTS, max_new_tokens=5, temperature=0) == first
    a, b, _ = spy.take()
    assert all(torch.equal(x, y) for x, y in zip(a["scores"], b["scores"], strict=True))
    # same prompt, different images: the pixels change the scores (the vision path is live)
    model.caption([IMAGES[0], IMAGES[1]], [PROMPTS[0], PROMPTS[0]], max_new_tokens=1)
    [call] = spy.take()
    assert not torch.allclose(call["scores"][0][0], call["scores"][0][1])
    assert model.caption([], []) == [] and model.answer([], []) == []


def test_prompts_cannot_open_image_slots_or_end_the_turn(vlm: tuple[str, Path, Any, Spy]) -> None:
    _, _, model, _ = vlm
    prompted = model.caption(IMAGES, PROMPTS, max_new_tokens=4)
    # the architecture's media placeholders and turn markers are taken out of a prompt (a stray
    # image token would not match the image features, a stray end of turn would cut the prompt)
    markers = [m for m in (model.processor.image_token, getattr(model.processor, "video_token", None),
                           model.tokenizer.eos_token, model.tokenizer.bos_token) if m]
    sneaky = [f"{markers[0]} {PROMPTS[0]} {markers[-1]}", f"{PROMPTS[1]}{''.join(markers)}",
              f"a {' '.join(markers)} red"]
    assert model.caption(IMAGES, sneaky, max_new_tokens=4) == prompted
    assert model.answer(IMAGES[:1], [f"{markers[0]}{QUESTIONS[0]}"], max_new_tokens=2) == model.answer(
        IMAGES[:1], QUESTIONS[:1], max_new_tokens=2)


def test_declared_params(vlm: tuple[str, Path, Any, Spy]) -> None:
    _, _, model, spy = vlm
    spy.take()
    # max_new_tokens through the seam, as the worker calls it
    out = serving.run(model, "answer", [IMAGES, QUESTIONS], {"max_new_tokens": 3})
    [call] = spy.take()
    assert len(out) == 3 and call["sequences"].shape[1] - call["inputs"]["input_ids"].shape[1] == 3
    # sampling: seeded per item, so a batch equals its items alone and reordering
    kw = {"max_new_tokens": 6, "temperature": 1.0, "top_p": 0.95}
    sampled = model.caption(IMAGES, PROMPTS, seeds=[1, 2, 3], **kw)
    assert model.caption(IMAGES, PROMPTS, seeds=[1, 2, 3], **kw) == sampled
    assert [model.caption([im], [p], seeds=[s], **kw)[0]
            for im, p, s in zip(IMAGES, PROMPTS, (1, 2, 3), strict=True)] == sampled
    assert model.caption(IMAGES[::-1], PROMPTS[::-1], seeds=[3, 2, 1], **kw) == sampled[::-1]
    assert model.caption(IMAGES, PROMPTS, seeds=[4, 5, 6], **kw) != sampled
    # n: n samples per item when sampling, the n best beams (batched like greedy) when greedy
    many = model.answer(IMAGES, QUESTIONS, seeds=[1, 2, 3], n=3, max_new_tokens=6, temperature=1.0)
    assert [len(s) for s in many] == [3, 3, 3] and all(len(set(s)) > 1 for s in many), many
    beams = serving.run(model, "answer", [IMAGES, QUESTIONS], {"n": 2, "max_new_tokens": 4})
    assert [len(b) for b in beams] == [2, 2, 2] and all(b[0] != b[1] for b in beams), beams
    assert beams == [model.answer([im], [q], n=2, max_new_tokens=4)[0]
                     for im, q in zip(IMAGES, QUESTIONS, strict=True)]
    spy.take()


def test_paligemma_without_a_chat_template_captions(tmp_path: Path) -> None:
    path = tv.build_paligemma(tmp_path / "pg", chat_template=False)
    model = registry.load("hf:" + str(path), device="cpu")
    serving.check_call(model.info, "caption", {})  # the folder declares caption
    out = serving.run(model, "caption", [IMAGES], {})
    assert len(out) == 3 and all(out), out
