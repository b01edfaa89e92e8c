"""OpenAI request bodies as Loom work: which task, which job params, which items.

Written once, here, for the synchronous routes of /openai/v1 and for every line of a batch
input file alike; routes only call ``to_work``. The rules, per endpoint:

- ``/v1/chat/completions``: the user messages hold exactly one image, as an ``image_url`` part:
  a ``data:image/...;base64,`` URL (stored at submission like ``image_base64``) or an http(s)
  URL (fetched by the worker through the SSRF guard, like an item's ``image_url``). Their text,
  when it ends with "?", is a question: task ``vqa``. Otherwise it is an instruction, or there is
  none: task ``caption``; the instruction (after any system text) reaches the model as the job
  param ``prompt`` only when the model takes a free prompt, else it is dropped and the caption
  is the model's own. ``max_tokens`` / ``max_completion_tokens`` -> ``max_new_tokens``;
  ``temperature``, ``top_p``, ``seed`` keep their names; each goes to the job only when the
  model declares it (``tasks.caps_for(model).params``) and is dropped otherwise, as a model
  that cannot sample ignores a temperature. A JSON ``response_format`` is a promise about the
  reply, so a model that does not declare it is a 400. No image, more than one, assistant turns,
  ``n`` > 1, ``stream``, ``tools``: 400.
- ``/v1/embeddings``: task ``embed``; every input is an image URL (data: or http(s)). Loom has
  no task that embeds text, so a text input is a 400 that says so.
- ``/v1/images/generations``: task ``generate``, ``n`` items (at most 10); ``seed`` (a Loom
  extension, sent by Loom's own ``openai:`` backend) gives item i the seed + i, else each item
  gets a random seed that lineage records; ``size`` only for models that take width and height;
  ``response_format`` ``b64_json`` (the default here).

Torch-free and FastAPI-free: the API and the batch validation call it.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from loom import media, tasks
from loom.errors import BadRequest, InvalidInput, InvalidRequest, PayloadTooLarge
from loom.task_params import PROMPT_MAX_CHARS

CHAT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"
IMAGES = "/v1/images/generations"
ENDPOINTS = (CHAT, EMBEDDINGS, IMAGES)
MAX_IMAGES_PER_REQUEST = 10  # OpenAI's n limit for image generation
# The item metadata key that a caption instruction travels in: the job's ``prompt`` is the
# template "{instruction}", filled per item by the worker, so lines with different
# instructions still share one job (and the cache keys on the filled instruction).
INSTRUCTION = "instruction"
INSTRUCTION_TEMPLATE = "{" + INSTRUCTION + "}"
# The item metadata key that holds the request's ``Work.reply`` (what shaping its reply needs).
REPLY = "openai"
_SIZE = re.compile(r"^(\d{2,5})x(\d{2,5})$")
# OpenAI's name of each sampling param, for the messages of a 400.
_SAMPLING = (("max_new_tokens", ("max_completion_tokens", "max_tokens")),
             ("temperature", ("temperature",)), ("top_p", ("top_p",)), ("seed", ("seed",)))


@dataclass(frozen=True)
class WorkItem:
    """One Loom item: its input (without the image's storage key, which submission assigns to
    inline bytes), the inline image bytes of a data URL or None, and its metadata."""

    input: dict[str, Any]
    image: bytes | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Work:
    """One OpenAI request as Loom work: a task, its job params and its items (one per image to
    describe or embed, one per image to draw). ``reply`` is what shaping the response needs
    besides the results (``loom.openai_replies``): the model name as asked, the output format,
    the words of the request's text (usage)."""

    task: str
    params: dict[str, Any]
    items: list[WorkItem]
    reply: dict[str, Any]

    def rows(self, **metadata: Any) -> list[tuple[dict[str, Any], bytes | None]]:
        """The items as submission takes them: ({"input", "metadata"}, inline bytes | None);
        each item's metadata carries ``reply`` and ``metadata`` (a batch line's custom_id)."""
        return [({"input": dict(it.input),
                  "metadata": {**it.metadata, **metadata, REPLY: self.reply}}, it.image)
                for it in self.items]


@dataclass(frozen=True)
class Limits:
    max_text_chars: int  # the longest question / prompt (LOOM_MAX_TEXT_CHARS)
    max_image_bytes: int  # the largest inline image (LOOM_MAX_INPUT_BYTES)
    max_items: int  # the most items one request makes (LOOM_MAX_ITEMS_PER_REQUEST)


def request_model(body: Any) -> str:
    """The ``model`` a request body names (required, as in OpenAI's API)."""
    if not isinstance(body, Mapping):
        raise BadRequest("the request body must be a JSON object", param=None)
    model = body.get("model")
    if not isinstance(model, str) or not model.strip() or len(model) > 2000:
        raise BadRequest("model: required, the name of a model (see GET /models)",
                         param="model")
    return model


def to_work(endpoint: str, body: Mapping[str, Any], *, model: str, caps: tasks.ModelCaps,
            limits: Limits) -> Work:
    """The Loom work for ``body`` sent to ``endpoint`` (one of ENDPOINTS), for ``model`` whose
    capabilities are ``caps``. Raises BadRequest (400) naming the field at fault."""
    tasks.json_safe(dict(body), "body")
    if endpoint == CHAT:
        return chat_work(body, model=model, caps=caps, limits=limits)
    if endpoint == EMBEDDINGS:
        return embeddings_work(body, model=model, caps=caps, limits=limits)
    if endpoint == IMAGES:
        return images_work(body, model=model, caps=caps, limits=limits)
    raise BadRequest(f"endpoint: one of {', '.join(ENDPOINTS)} (got {str(endpoint)[:80]!r})",
                     param="endpoint", code="unsupported_endpoint")


# --- chat ------------------------------------------------------------------------------------


def chat_work(body: Mapping[str, Any], *, model: str, caps: tasks.ModelCaps,
              limits: Limits) -> Work:
    for name, bad in (("stream", True), ("tools", None), ("functions", None)):
        value = body.get(name)
        if value and (bad is None or value is bad):
            raise BadRequest(f"{name}: not supported; Loom answers a whole response at once",
                             param=name, code="unsupported_parameter")
    system, user, images = _read_messages(body.get("messages"))
    if not images:
        raise BadRequest(
            f"messages: model {model!r} needs an image: add one image_url part to the user "
            "message (Loom's chat tasks describe or answer questions about an image)",
            param="messages", code="image_required")
    if len(images) > 1:
        raise BadRequest("messages: one image per request", param="messages",
                         code="too_many_images")
    task = "vqa" if user.endswith("?") else "caption"
    _check_serves(model, caps, task, what="answer questions about images" if task == "vqa"
                  else "describe images")
    spec = tasks.get(task)
    inp, data = image_input(images[0], param="messages", limits=limits)
    metadata: dict[str, Any] = {}
    params = sampling_params(spec, caps, body)
    n = _choices_wanted(spec, caps, body, model=model)
    if n > 1:
        params["n"] = n
    if task == "vqa":
        inp["question"] = user
    else:
        instruction = "\n".join(t for t in (system, user) if t)
        if instruction and _takes(caps, spec, "prompt"):
            if len(instruction) > PROMPT_MAX_CHARS:
                raise BadRequest(f"messages: the instruction is {len(instruction)} characters; "
                                 f"the limit is {PROMPT_MAX_CHARS}",
                                 param="messages")
            params["prompt"] = INSTRUCTION_TEMPLATE
            metadata[INSTRUCTION] = instruction
    item_input = _validated(spec, inp, data, limits=limits, param="messages")
    words = len(f"{system} {user}".split())
    return Work(task=task, params=params, items=[WorkItem(item_input, data, metadata)],
                reply={"model": model, "words": words})


def _choices_wanted(spec: tasks.TaskSpec, caps: tasks.ModelCaps, body: Mapping[str, Any], *,
                    model: str) -> int:
    """``n``: how many choices the reply holds (one item, its n outputs). Refused, never
    dropped, when the model gives one: the client would count on n."""
    value = body.get("n")
    if value is None:
        return 1
    p = spec.param("n")
    assert p is not None, "text tasks take n"
    try:
        n = int(p.check(value, "n"))
    except InvalidRequest as exc:
        raise BadRequest(exc.message, param="n") from None
    if n > 1 and not _takes(caps, spec, "n"):
        raise BadRequest(f"n: model {model!r} gives one choice per request", param="n",
                         code="unsupported_parameter")
    return n


def _read_messages(messages: Any) -> tuple[str, str, list[str]]:
    """(system text, user text, image URLs) of a single-turn chat."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: a non-empty list of messages", param="messages")
    system: list[str] = []
    user: list[str] = []
    images: list[str] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise BadRequest(f"{where}: expected an object with role and content", param=where)
        role = message.get("role")
        if role in ("assistant", "tool", "function"):
            raise BadRequest(f"{where}: multi-turn conversations are not supported; send one "
                             "user message (and optionally a system message)", param=where,
                             code="unsupported_parameter")
        if role not in ("user", "system", "developer"):
            raise BadRequest(f"{where}.role: expected user, system or developer", param=where)
        texts, urls = _read_content(message.get("content"), where)
        if role == "user":
            user.extend(texts)
            images.extend(urls)
        elif urls:
            raise BadRequest(f"{where}: images go in the user message", param=where)
        else:
            system.extend(texts)
    return "\n".join(system).strip(), "\n".join(user).strip(), images


def _read_content(content: Any, where: str) -> tuple[list[str], list[str]]:
    if isinstance(content, str):
        return [content], []
    if not isinstance(content, list):
        raise BadRequest(f"{where}.content: a string or a list of parts", param=where)
    texts: list[str] = []
    urls: list[str] = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, Mapping) else ref
            if not isinstance(url, str):
                raise BadRequest(f"{at}.image_url.url: required", param=at)
            urls.append(url)
        else:
            raise BadRequest(f"{at}: expected a text or image_url part", param=at,
                             code="unsupported_content")
    return texts, urls


def sampling_params(spec: tasks.TaskSpec, caps: tasks.ModelCaps,
                    body: Mapping[str, Any]) -> dict[str, Any]:
    """The job params of a chat body's sampling fields: checked as Loom checks them, kept only
    when the model declares them. A JSON ``response_format`` needs a model that declares it."""
    out: dict[str, Any] = {}
    for name, aliases in _SAMPLING:
        given = next(((a, body[a]) for a in aliases if body.get(a) is not None), None)
        p = spec.param(name)
        if given is None or p is None:
            continue
        try:
            value = p.check(given[1], given[0])
        except InvalidRequest as exc:
            raise BadRequest(exc.message, param=given[0]) from None
        if _takes(caps, spec, name):
            out[name] = value
    fmt = body.get("response_format")
    if isinstance(fmt, Mapping) and fmt.get("type") in ("json_object", "json_schema"):
        if spec.param("response_format") is None or not _takes(caps, spec, "response_format"):
            raise BadRequest("response_format: this model cannot promise JSON replies",
                             param="response_format", code="unsupported_parameter")
        out["response_format"] = dict(fmt)
    elif fmt is not None and not (isinstance(fmt, Mapping) and fmt.get("type") == "text"):
        raise BadRequest("response_format: expected {\"type\": \"text\" | \"json_object\" | "
                         "\"json_schema\"}", param="response_format")
    return out


# --- embeddings and images -------------------------------------------------------------------


def embeddings_work(body: Mapping[str, Any], *, model: str, caps: tasks.ModelCaps,
                    limits: Limits) -> Work:
    _check_serves(model, caps, "embed", what="embed images")
    if body.get("dimensions") is not None:
        raise BadRequest("dimensions: this model's vectors have one size", param="dimensions",
                         code="unsupported_parameter")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise BadRequest("encoding_format: float or base64", param="encoding_format")
    raw = body.get("input")
    inputs = [raw] if isinstance(raw, str) else raw
    if not isinstance(inputs, list) or not inputs or len(inputs) > limits.max_items:
        raise BadRequest(f"input: an image URL or a list of 1 to {limits.max_items}",
                         param="input")
    spec = tasks.get("embed")
    items = []
    for i, value in enumerate(inputs):
        if not isinstance(value, str) or not value.startswith(("data:", "http://", "https://")):
            raise BadRequest(
                f"input[{i}]: model {model!r} embeds images, not text: give each input as an "
                "image URL (data:image/png;base64,... or https://...)", param="input",
                code="unsupported_input")
        inp, data = image_input(value, param="input", limits=limits)
        items.append(WorkItem(_validated(spec, inp, data, limits=limits, param="input"), data))
    return Work(task="embed", params={}, items=items,
                reply={"model": model, "format": fmt, "words": 0})


def images_work(body: Mapping[str, Any], *, model: str, caps: tasks.ModelCaps,
                limits: Limits) -> Work:
    _check_serves(model, caps, "generate", what="draw images")
    spec = tasks.get("generate")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadRequest("prompt: required", param="prompt")
    n = body.get("n", 1) if body.get("n") is not None else 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_IMAGES_PER_REQUEST:
        raise BadRequest(f"n: an integer from 1 to {MAX_IMAGES_PER_REQUEST}", param="n")
    fmt = body.get("response_format") or "b64_json"
    if fmt != "b64_json":
        raise BadRequest("response_format: Loom returns images as b64_json",
                         param="response_format", code="unsupported_parameter")
    params: dict[str, Any] = {}
    size = body.get("size")
    if size not in (None, "auto"):
        found = _SIZE.match(size) if isinstance(size, str) else None
        if found is None:
            raise BadRequest("size: WIDTHxHEIGHT, e.g. 1024x1024", param="size")
        if not (_takes(caps, spec, "width") and _takes(caps, spec, "height")):
            raise BadRequest(f"size: model {model!r} draws at its own size; leave size out",
                             param="size", code="unsupported_parameter")
        for name, value in zip(("width", "height"), map(int, found.groups())):
            params[name] = _checked(spec, name, value, "size")
    seed = body.get("seed")
    if seed is not None:
        tasks.check_seed(seed, "seed", error=BadRequest)
        if seed + n - 1 > tasks.SEED_MAX:
            raise BadRequest(f"seed: seed + n passes the largest seed {tasks.SEED_MAX}",
                             param="seed")
    items = []
    for i in range(n):
        inp = {"prompt": prompt, "seed": tasks.item_seed(given=None, base=seed, index=i)}
        items.append(WorkItem(_validated(spec, inp, None, limits=limits, param="prompt")))
    return Work(task="generate", params=params, items=items,
                reply={"model": model, "format": fmt, "words": len(prompt.split())})


# --- shared ----------------------------------------------------------------------------------


def image_input(url: str, *, param: str, limits: Limits) -> tuple[dict[str, Any], bytes | None]:
    """({"image_url": url}, None) for an http(s) URL; ({}, bytes) for a data URL."""
    if url.startswith("data:"):
        head, sep, payload = url.partition(",")
        if not sep or not head.endswith(";base64"):
            raise BadRequest(f"{param}: an image data URL is data:image/<type>;base64,<data>",
                             param=param, code="invalid_image_url")
        if len(payload) > limits.max_image_bytes * 4 // 3 + 4:
            raise PayloadTooLarge(f"{param}: image larger than {limits.max_image_bytes} bytes")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(f"{param}: the image data URL is not valid base64", param=param,
                             code="invalid_image_url") from None
        try:
            media.image_format(data)
        except InvalidInput as exc:
            raise BadRequest(f"{param}: {exc.message}", param=param,
                             code="invalid_image") from None
        return {}, data
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequest(f"{param}: an image URL is data:image/...;base64,... or http(s)://...",
                         param=param, code="invalid_image_url")
    return {"image_url": url}, None


def _validated(spec: tasks.TaskSpec, inp: dict[str, Any], data: bytes | None, *,
               limits: Limits, param: str) -> dict[str, Any]:
    """The item input as the task's spec checks it (an inline image stands in as a key)."""
    probe = {**inp, "image_key": "(inline)"} if data is not None else inp
    try:
        out = spec.validate_input(probe, where=param, max_text_chars=limits.max_text_chars)
    except InvalidRequest as exc:
        raise BadRequest(exc.message, param=param) from None
    if data is not None:
        del out["image_key"]
    return out


def _checked(spec: tasks.TaskSpec, name: str, value: Any, param: str) -> Any:
    p = spec.param(name)
    assert p is not None
    try:
        return p.check(value, param)
    except InvalidRequest as exc:
        raise BadRequest(exc.message, param=param) from None


def _takes(caps: tasks.ModelCaps, spec: tasks.TaskSpec, name: str) -> bool:
    """Whether the model takes the job param ``name`` of ``spec`` (Loom's own params, such as
    generate's base seed, always; model params when the model declares their keyword)."""
    p = spec.param(name)
    if p is None:
        return False
    return not p.model or p.keyword in caps.params.get(spec.name, ())


def _check_serves(model: str, caps: tasks.ModelCaps, task: str, *, what: str) -> None:
    if task not in caps.tasks:
        raise BadRequest(f"model {model!r} cannot {what} (Loom task {task!r}); it serves "
                         f"{', '.join(caps.tasks) or 'no tasks'}", param="model",
                         code="unsupported_task")
