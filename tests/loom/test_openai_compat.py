"""The mapping from OpenAI request bodies to Loom work (loom/openai_compat.py): which task, which
job params (only those the model declares), which items; what a model cannot do is a 400."""

from __future__ import annotations

import base64
import io
from typing import Any

import pytest

from loom import openai_compat as oc
from loom import tasks
from loom.errors import BadRequest

LIMITS = oc.Limits(max_text_chars=200, max_image_bytes=100_000, max_items=10)
SHAPES = tasks.caps_for("loom-shapes")
HF = tasks.caps_for("hf:/models/smolvlm")
DIFFUSERS = tasks.caps_for("diffusers:/models/sd")


def png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def data_url() -> str:
    return "data:image/png;base64," + base64.b64encode(png()).decode()


def chat(text: str | None = None, *, image: str | None = "data", **extra: Any) -> dict[str, Any]:
    parts: list[dict[str, Any]] = []
    if image is not None:
        url = data_url() if image == "data" else image
        parts.append({"type": "image_url", "image_url": {"url": url}})
    if text is not None:
        parts.append({"type": "text", "text": text})
    return {"model": "m", "messages": [{"role": "user", "content": parts}], **extra}


def work(body: dict[str, Any], caps: Any = SHAPES, endpoint: str = oc.CHAT) -> oc.Work:
    assert caps is not None
    return oc.to_work(endpoint, body, model="m", caps=caps, limits=LIMITS)


def refused(body: dict[str, Any], caps: Any = SHAPES, endpoint: str = oc.CHAT) -> BadRequest:
    with pytest.raises(BadRequest) as info:
        work(body, caps, endpoint)
    assert info.value.http_status == 400
    return info.value


def test_a_question_is_vqa_and_an_instruction_or_nothing_is_caption() -> None:
    w = work(chat("what color is the circle?"))
    assert w.task == "vqa" and w.items[0].input == {"question": "what color is the circle?"}
    assert w.items[0].image == png() and w.params == {}
    for text in ("Describe this image.", None, "  "):
        w = work(chat(text))
        assert w.task == "caption" and w.items[0].input == {}
    url = work(chat("Describe.", image="https://example.com/a.png"))
    assert url.items[0].input == {"image_url": "https://example.com/a.png"}
    assert url.items[0].image is None


def test_the_instruction_reaches_only_a_model_that_takes_a_prompt() -> None:
    # loom-shapes reads no free prompt: the instruction is dropped, the caption is its own.
    assert work(chat("Describe it in French.")).params == {}
    w = work({**chat("Describe it in French."),
              "messages": [{"role": "system", "content": "Be brief."},
                           *chat("Describe it in French.")["messages"]]}, HF)
    assert w.params == {"prompt": oc.INSTRUCTION_TEMPLATE}
    assert w.items[0].metadata == {oc.INSTRUCTION: "Be brief.\nDescribe it in French."}


def test_sampling_params_go_only_where_the_model_declares_them() -> None:
    body = chat("Describe.", max_tokens=40, temperature=0.5, top_p=0.9, seed=3)
    assert work(body).params == {}  # loom-shapes: greedy, none of them
    assert work(body, HF).params == {"max_new_tokens": 40, "temperature": 0.5, "top_p": 0.9,
                                     "seed": 3, "prompt": oc.INSTRUCTION_TEMPLATE}
    assert work(chat("Describe.", max_completion_tokens=7), HF).params["max_new_tokens"] == 7
    # Out of range is a 400 naming OpenAI's field, whatever the model.
    assert refused(chat("Describe.", temperature=5)).param == "temperature"
    assert refused(chat("Describe.", max_tokens=0), HF).param == "max_tokens"


def test_n_choices_are_one_item_with_n_outputs_where_the_model_gives_them() -> None:
    assert work(chat("Describe.", n=3, temperature=1.0), HF).params["n"] == 3
    assert "n" not in work(chat("Describe.", n=1), HF).params  # one choice: the plain reply
    assert "n" not in work(chat("Describe.", n=1)).params
    # Never dropped: a model that gives one choice refuses n, naming it; out of range is a 400.
    exc = refused(chat("Describe.", n=2))
    assert (exc.param, exc.code) == ("n", "unsupported_parameter") and "one choice" in exc.message
    assert refused(chat("Describe.", n=17), HF).param == "n"
    assert refused(chat("Describe.", n="two"), HF).param == "n"


def test_what_the_model_cannot_do_is_a_400_naming_the_field() -> None:
    cases = [
        (chat("hello", image=None), "messages", "image_required"),
        ({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url()}},
            {"type": "image_url", "image_url": {"url": data_url()}}]}]}, "messages",
         "too_many_images"),
        (chat("hi", n=2), "n", "unsupported_parameter"),
        (chat("hi", stream=True), "stream", "unsupported_parameter"),
        (chat("hi", response_format={"type": "json_object"}), "response_format",
         "unsupported_parameter"),
        (chat("hi", image="ftp://example.com/a.png"), "messages", "invalid_image_url"),
        (chat("hi", image="data:image/png;base64,AAAA"), "messages", "invalid_image"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"},
                                     {"role": "assistant", "content": "yo"}]},
         "messages[1]", "unsupported_parameter"),
    ]
    for body, param, code in cases:
        exc = refused(body)
        assert (exc.param, exc.code) == (param, code), (body, exc.message)
    # A model that serves neither caption nor vqa.
    assert refused(chat("Describe."), DIFFUSERS).code == "unsupported_task"
    assert refused({"messages": []}).param == "messages"
    with pytest.raises(BadRequest, match="model"):
        oc.request_model({"messages": []})


def test_embeddings_take_image_urls_and_refuse_text() -> None:
    w = work({"model": "m", "input": [data_url(), "https://example.com/b.png"]},
             endpoint=oc.EMBEDDINGS)
    assert w.task == "embed" and len(w.items) == 2 and w.reply["format"] == "float"
    assert w.items[1].input == {"image_url": "https://example.com/b.png"}
    exc = refused({"model": "m", "input": "a red circle"}, endpoint=oc.EMBEDDINGS)
    assert exc.code == "unsupported_input" and "embeds images, not text" in exc.message
    assert refused({"model": "m", "input": [data_url()], "dimensions": 8},
                   endpoint=oc.EMBEDDINGS).param == "dimensions"
    assert refused({"model": "m", "input": [data_url()] * 11},
                   endpoint=oc.EMBEDDINGS).param == "input"
    assert refused({"model": "m", "input": [data_url()]}, DIFFUSERS,
                   oc.EMBEDDINGS).code == "unsupported_task"


def test_image_generation_items_seeds_and_size() -> None:
    w = work({"model": "m", "prompt": "a small red circle", "n": 3, "seed": 10},
             endpoint=oc.IMAGES)
    assert w.task == "generate" and w.params == {}
    assert [it.input for it in w.items] == [
        {"prompt": "a small red circle", "seed": s} for s in (10, 11, 12)]
    unseeded = work({"model": "m", "prompt": "a small red circle"}, endpoint=oc.IMAGES)
    assert isinstance(unseeded.items[0].input["seed"], int)  # random, recorded in lineage
    assert refused({"model": "m", "prompt": "x", "size": "512x512"},
                   endpoint=oc.IMAGES).code == "unsupported_parameter"
    sized = work({"model": "m", "prompt": "x", "size": "512x768"}, DIFFUSERS, oc.IMAGES)
    assert sized.params == {"width": 512, "height": 768}
    assert refused({"model": "m", "prompt": "x", "response_format": "url"},
                   endpoint=oc.IMAGES).param == "response_format"
    assert refused({"model": "m", "prompt": "x", "n": 11}, endpoint=oc.IMAGES).param == "n"
    assert refused({"model": "m", "prompt": "x" * 201}, endpoint=oc.IMAGES).param == "prompt"


def test_rows_carry_what_the_reply_needs() -> None:
    w = work(chat("what shape is it?"))
    [(row, data)] = w.rows(custom_id="r1", line=4)
    assert data == png() and row["input"] == {"question": "what shape is it?"}
    assert row["metadata"] == {"custom_id": "r1", "line": 4,
                               oc.REPLY: {"model": "m", "words": 4}}
