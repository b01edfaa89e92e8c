"""``openai:SERVED_NAME@BASE_URL``: any OpenAI-compatible server (vLLM, SGLang, TGI, Ollama, Loom's
own /openai/v1) behind the serving seam (pipeline/serving.py), torch-free.

A batch becomes one HTTP request per item, many in flight: an adaptive window (AIMD) grows by one
on each success up to ``openai_max_in_flight``, halves on 429/503, and a ``Retry-After`` holds
every request to that endpoint until it has passed. Within one call a request is retried on
connection errors, timeouts, 408/409/429/5xx (``RETRIES`` times, with backoff); what still fails
goes back to Loom as a transient ``ModelError`` for that item alone (Loom retries it up to the
attempt cap). 400/404/422 fail the item for good (``model_refused``, the server's message kept);
401/403 too, and the endpoint is then not asked again for ``STOP_SECONDS`` (every item of the
job would get the same answer). Images go as base64 data URLs of the exact bytes whose sha256 is
in lineage (``takes_bytes``). ``finish_reason`` is recorded on each text output; a
``response_format`` with a JSON schema is checked, one retry, then ``invalid_output``.

Lineage: the endpoint and the served model id (from ``GET /models``), ``weights_sha256`` empty
and ``weights_verified: false`` (Loom cannot hash weights it does not hold). The API key is read
from the environment variable that ``LOOM_OPENAI_API_KEY_ENV`` names; it is never stored.
"""

from __future__ import annotations

import base64
import io
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx

from loom.errors import InvalidOutput, LoomError, ModelError, ModelRefused, UnsupportedTask
from worker.outputs import Text

PREFIX = "openai:"
RETRIES = 3  # per request, within one call
BACKOFF_SECONDS = 0.5  # first retry; doubled each time, unless Retry-After says otherwise
STOP_SECONDS = 60.0  # how long a 401/403 keeps the endpoint from being asked again
TRANSIENT = frozenset({408, 409, 429, 500, 502, 503, 504})
DEFAULT_INSTRUCTION = "Describe this image."
CHAT = ("prompts", "max_new_tokens", "temperature", "top_p", "seeds", "n", "response_format")


@dataclass
class OpenAIInfo:
    name: str
    version: str  # the served model id
    weights_sha256: str = ""
    tasks: tuple[str, ...] = ("caption", "vqa", "embed", "generate")
    params: dict[str, tuple[str, ...]] = field(default_factory=lambda: {
        "caption": CHAT, "vqa": CHAT[1:], "embed": (), "generate": ("width", "height")})
    details: dict[str, Any] = field(default_factory=dict)


def parse_ref(ref: str) -> tuple[str, str]:
    """``openai:NAME@URL`` (or ``NAME@URL``) -> (NAME, URL without a trailing slash)."""
    body = ref[len(PREFIX):] if ref.startswith(PREFIX) else ref
    name, sep, url = body.rpartition("@")
    if not sep or not name or not url.startswith(("http://", "https://")):
        raise UnsupportedTask(f"model {ref!r}: expected openai:SERVED_NAME@http(s)://HOST/v1")
    return name, url.rstrip("/")


class Window:
    """How many requests may be in flight: +1 per success (up to ``limit``), halved on
    throttling; ``hold(seconds)`` keeps everyone out until then (Retry-After)."""

    def __init__(self, limit: int, start: int = 4) -> None:
        self.limit = limit
        self.size = float(min(start, limit))
        self.in_flight = 0
        self.held_until = 0.0
        self._cond = threading.Condition()

    def acquire(self) -> None:
        with self._cond:
            while True:
                wait = self.held_until - time.monotonic()
                if wait <= 0 and self.in_flight < int(self.size):
                    self.in_flight += 1
                    return
                self._cond.wait(timeout=wait if wait > 0 else 1.0)

    def release(self, *, ok: bool, throttled: bool = False, hold: float = 0.0) -> None:
        with self._cond:
            self.in_flight -= 1
            if throttled:
                self.size = max(1.0, self.size / 2)
            elif ok:
                self.size = min(float(self.limit), self.size + 1)
            if hold > 0:
                self.held_until = max(self.held_until, time.monotonic() + hold)
            self._cond.notify_all()


class _Transient(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class OpenAIModel:
    """One endpoint and served model, shared by every batch of this process."""

    takes_bytes = True  # the image arguments are the input's bytes, not decoded images

    def __init__(self, ref: str, *, api_key: str | None, timeout: float, max_in_flight: int,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.served, self.base_url = parse_ref(ref)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout,
                                 transport=transport,
                                 limits=httpx.Limits(max_connections=max_in_flight,
                                                     max_keepalive_connections=max_in_flight))
        self.window = Window(max_in_flight)
        self.pool = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="loom-oai")
        self.stopped: tuple[float, str] | None = None  # (until, why) after a 401/403
        self.info = OpenAIInfo(name=f"{PREFIX}{self.served}@{self.base_url}",
                               version=self._served_id())
        self.info.details = {"endpoint": self.base_url, "served_model": self.info.version,
                             "weights_verified": False}

    # --- the endpoint ---------------------------------------------------------------------

    def _served_id(self) -> str:
        """The id ``GET /models`` gives the served model (it must be listed)."""
        try:
            response = self.http.get("/models")
        except httpx.HTTPError as exc:
            raise ModelError(f"{self.base_url}/models: {type(exc).__name__}: {exc}") from exc
        if response.status_code in (401, 403):
            raise ModelRefused(f"{self.base_url} refused the API key ({response.status_code})")
        if response.status_code != 200:
            raise ModelError(f"{self.base_url}/models answered {response.status_code}")
        ids = [m.get("id") for m in response.json().get("data", []) if isinstance(m, dict)]
        if self.served not in ids:
            raise UnsupportedTask(f"{self.base_url} does not serve {self.served!r} "
                                  f"(it serves {', '.join(map(str, ids)) or 'nothing'})")
        return self.served

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """One request, retried within the call while it fails transiently."""
        delay = BACKOFF_SECONDS
        for attempt in range(RETRIES + 1):
            if self.stopped is not None and time.monotonic() < self.stopped[0]:
                raise ModelRefused(self.stopped[1])
            self.window.acquire()
            ok = throttled = False
            hold = 0.0
            try:
                response = self.http.post(path, json=body)
                status = response.status_code
                if status in (429, 503):
                    throttled, hold = True, _retry_after(response) or 0.0
                if status in TRANSIENT:
                    raise _Transient(f"{path} answered {status}", _retry_after(response))
                if status in (401, 403):
                    why = f"{self.base_url} refused the API key ({status}): {response.text[:200]}"
                    self.stopped = (time.monotonic() + STOP_SECONDS, why)
                    raise ModelRefused(why)
                if status >= 400:
                    raise ModelRefused(f"{path} answered {status}: {response.text[:300]}")
                ok = True
                return dict(response.json())
            except _Transient as exc:
                if attempt == RETRIES:
                    raise ModelError(f"{exc} ({RETRIES + 1} tries)") from None
                time.sleep(exc.retry_after if exc.retry_after is not None else delay)
                delay *= 2
            except httpx.HTTPError as exc:  # resets, timeouts, refused connections
                if attempt == RETRIES:
                    raise ModelError(f"{path}: {type(exc).__name__}: {exc} "
                                     f"({RETRIES + 1} tries)") from None
                time.sleep(delay)
                delay *= 2
            finally:
                self.window.release(ok=ok, throttled=throttled, hold=hold)
        raise AssertionError("unreachable")

    def _each(self, n: int, one: Callable[[int], Any]) -> list[Any]:
        """``one(i)`` for every item, in flight together; an item's error takes its place."""
        def safe(i: int) -> Any:
            try:
                return one(i)
            except LoomError as exc:
                return exc
            except Exception as exc:  # a malformed reply: this item only
                return ModelError(f"{self.base_url}: {type(exc).__name__}: {exc}")

        return list(self.pool.map(safe, range(n)))

    # --- tasks --------------------------------------------------------------------------

    @staticmethod
    def _image_part(data: bytes) -> dict[str, Any]:
        from loom import media

        url = f"data:image/{media.image_format(data)};base64,{base64.b64encode(data).decode()}"
        return {"type": "image_url", "image_url": {"url": url}}

    def _chat(self, image: bytes, text: str, *, seed: int | None, max_new_tokens: int | None,
              temperature: float | None, top_p: float | None, n: int | None,
              response_format: dict[str, Any] | None) -> Text | list[Text]:
        """One request; with ``n``, its n choices (a list), else the one reply."""
        body: dict[str, Any] = {"model": self.served, "messages": [{"role": "user", "content": [
            self._image_part(image), {"type": "text", "text": text}]}]}
        for key, value in (("max_tokens", max_new_tokens), ("temperature", temperature),
                           ("top_p", top_p), ("seed", seed), ("n", n),
                           ("response_format", response_format)):
            if value is not None:
                body[key] = value
        for check in (True, False):  # an invalid structured reply gets one more try
            reply = self._post("/chat/completions", body)
            got = sorted(reply["choices"], key=lambda c: int(c.get("index") or 0))
            if len(got) != (n or 1):  # a server that ignores n: no retry will change that
                raise ModelRefused(f"{self.base_url}: asked for {n or 1} choice(s), got "
                                   f"{len(got)}; this server does not take n")
            texts = [Text(c["message"].get("content") or "",
                          {"finish_reason": c.get("finish_reason")}) for c in got]
            problem = next((p for p in (_schema_problem(t, response_format) for t in texts)
                            if p is not None), None)
            if problem is None:
                return texts if n is not None else texts[0]
            if not check:
                raise InvalidOutput(f"the reply does not match response_format: {problem}")
        raise AssertionError("unreachable")

    def caption(self, images: Sequence[bytes], prompts: Sequence[str] | None = None, *,
                seeds: Sequence[int] | None = None, max_new_tokens: int | None = None,
                temperature: float | None = None, top_p: float | None = None,
                n: int | None = None,
                response_format: dict[str, Any] | None = None) -> list[Any]:
        return self._each(len(images), lambda i: self._chat(
            images[i], (prompts[i] if prompts and prompts[i] else DEFAULT_INSTRUCTION),
            seed=seeds[i] if seeds else None, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, n=n, response_format=response_format))

    def answer(self, images: Sequence[bytes], questions: Sequence[str], *,
               seeds: Sequence[int] | None = None, max_new_tokens: int | None = None,
               temperature: float | None = None, top_p: float | None = None,
               n: int | None = None,
               response_format: dict[str, Any] | None = None) -> list[Any]:
        return self._each(len(images), lambda i: self._chat(
            images[i], questions[i], seed=seeds[i] if seeds else None,
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, n=n,
            response_format=response_format))

    def _embedding(self, value: str) -> Any:
        import numpy as np

        reply = self._post("/embeddings", {"model": self.served, "input": [value]})
        vec = np.asarray(reply["data"][0]["embedding"], dtype=np.float32)
        norm = float(np.linalg.norm(vec))
        return vec / norm if norm > 0 else vec

    def embed(self, images: Sequence[bytes]) -> list[Any]:
        return self._each(len(images), lambda i: self._embedding(
            self._image_part(images[i])["image_url"]["url"]))

    def embed_text(self, texts: Sequence[str]) -> list[Any]:
        return self._each(len(texts), lambda i: self._embedding(texts[i]))

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], *,
                 width: int | None = None, height: int | None = None) -> list[Any]:
        from PIL import Image

        def one(i: int) -> Any:
            body: dict[str, Any] = {"model": self.served, "prompt": prompts[i], "n": 1,
                                    "response_format": "b64_json", "seed": seeds[i]}
            if width or height:
                body["size"] = f"{width or height}x{height or width}"
            reply = self._post("/images/generations", body)
            data = base64.b64decode(reply["data"][0]["b64_json"])
            image = Image.open(io.BytesIO(data))
            image.load()
            return image

        return self._each(len(prompts), one)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.http.close()


def _schema_problem(text: str, response_format: dict[str, Any] | None) -> str | None:
    """Why ``text`` does not satisfy ``response_format`` (None: it does, or none was asked)."""
    if not response_format or response_format.get("type") not in ("json_schema", "json_object"):
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        return f"not JSON ({exc})"
    schema = (response_format.get("json_schema") or {}).get("schema")
    if response_format["type"] == "json_object" or not schema:
        return None if isinstance(value, dict) else "not a JSON object"
    import jsonschema

    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as exc:
        return exc.message
    return None


def load_openai(ref: str, *, key_env: str, timeout: float, max_in_flight: int) -> OpenAIModel:
    """The model behind ``openai:NAME@URL``, its key read from the variable ``key_env``."""
    return OpenAIModel(ref, api_key=os.environ.get(key_env) or None, timeout=timeout,
                       max_in_flight=max_in_flight)
