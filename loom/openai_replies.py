"""Loom results as OpenAI response bodies: chat.completion, the embedding list, the images
response, and OpenAI's error shape; the one place these shapes are written, for the synchronous
routes and the lines of a batch's output and error files alike.

Usage counts words, not tokens (Loom's models have no shared tokenizer): ``prompt_tokens`` is
the number of words of the request's text, ``completion_tokens`` those of the reply.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from loom import openai_compat
from loom.storage import Store

# Item error codes that are the request's fault (OpenAI answers those 400); the rest are 500.
CLIENT_ERROR_CODES = frozenset({
    "invalid_input", "input_too_large", "invalid_key", "blocked_url", "fetch_failed",
    "input_missing", "input_mismatch", "unsupported_task", "unsupported_param",
    "invalid_output", "model_refused", "invalid_request"})
REPLY = openai_compat.REPLY


def unix(value: datetime | None) -> int | None:
    """A naive-UTC timestamp as Unix seconds (OpenAI's timestamps)."""
    return int(value.replace(tzinfo=UTC).timestamp()) if value is not None else None


def error_type(status: int) -> str:
    return {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
            429: "rate_limit_error"}.get(status, "invalid_request_error" if status < 500
                                         else "server_error")


def error_body(message: str, *, status: int, code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}``, OpenAI's error shape."""
    return {"error": {"message": message, "type": error_type(status), "param": param,
                      "code": code}}


def item_error_status(code: str | None) -> int:
    return 400 if code in CLIENT_ERROR_CODES else 500


@dataclass(frozen=True)
class Result:
    """One item's outcome, as a reply needs it (from a ``jobs.iter_results`` row)."""

    item_id: int
    index: int
    status: str
    metadata: dict[str, Any] = field(default_factory=dict)
    error_code: str | None = None
    error_message: str | None = None
    text: str | None = None
    vector: Any = None  # numpy float32 (embed)
    image: bytes | None = None  # the PNG (generate)
    finished_at: datetime | None = None
    finish_reason: str = "stop"
    choices: list[str] | None = None  # n outputs of one item (a chat request's n)
    finish_reasons: list[str] | None = None


def load_results(rows: Iterable[tuple[Any, Any]], store: Store,
                 threads: int = 8) -> list[Result]:
    """(item, output | None) rows -> Results; vectors and images are read from the store, in
    parallel when there are several."""
    rows = list(rows)

    def one(row: tuple[Any, Any]) -> Result:
        item, output = row
        extra: dict[str, Any] = {}
        if output is not None and item.status == "succeeded":
            if output.kind == "vector" and output.storage_key:
                import numpy as np

                extra["vector"] = np.load(io.BytesIO(store.get(output.storage_key)),
                                          allow_pickle=False)
            elif output.kind == "image" and output.storage_key:
                extra["image"] = store.get(output.storage_key)
            else:
                extra["text"] = output.text or ""
            details = getattr(output, "details", None) or {}
            if details.get("finish_reason"):
                extra["finish_reason"] = str(details["finish_reason"])
            if isinstance(details.get("choices"), list):
                extra["choices"] = [str(c) for c in details["choices"]]
            if isinstance(details.get("finish_reasons"), list):
                extra["finish_reasons"] = [str(r or "stop") for r in details["finish_reasons"]]
        return Result(item_id=item.id, index=item.index, status=item.status,
                      metadata=dict(item.item_metadata or {}), error_code=item.error_code,
                      error_message=item.error_message, finished_at=item.finished_at, **extra)

    if len(rows) > 1 and any(o is not None and o.kind in ("vector", "image") for _, o in rows):
        with ThreadPoolExecutor(min(threads, len(rows)), thread_name_prefix="loom-oai") as pool:
            return list(pool.map(one, rows))
    return [one(r) for r in rows]


def reply(endpoint: str, results: Sequence[Result], *, reply_id: str) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body) of the request whose items had ``results`` (in item order): its
    OpenAI response when every item succeeded, else the error of the first that did not."""
    opts = results[0].metadata.get(REPLY) or {}
    model = str(opts.get("model") or "")
    failed = next((r for r in results if r.status != "succeeded"), None)
    if failed is not None:
        status = item_error_status(failed.error_code)
        return status, error_body(failed.error_message or failed.status, status=status,
                                  code=failed.error_code or failed.status)
    created = max((unix(r.finished_at) or 0) for r in results)
    if endpoint == openai_compat.CHAT:
        return 200, chat_completion(results[0], model=model, reply_id=reply_id,
                                    created=created, words=int(opts.get("words") or 0))
    if endpoint == openai_compat.EMBEDDINGS:
        return 200, embedding_list(results, model=model,
                                   encoding=str(opts.get("format") or "float"))
    return 200, {"created": created, "data": [
        {"b64_json": base64.b64encode(r.image or b"").decode(), "revised_prompt": None}
        for r in results]}


def chat_completion(result: Result, *, model: str, reply_id: str, created: int,
                    words: int) -> dict[str, Any]:
    texts = result.choices or [result.text or ""]
    reasons = result.finish_reasons or [result.finish_reason] * len(texts)
    completion = sum(len(t.split()) for t in texts)
    return {
        "id": f"chatcmpl-{reply_id}", "object": "chat.completion", "created": created,
        "model": model, "system_fingerprint": None,
        "choices": [{"index": i, "message": {"role": "assistant", "content": text,
                                             "refusal": None},
                     "logprobs": None, "finish_reason": reason}
                    for i, (text, reason) in enumerate(zip(texts, reasons, strict=True))],
        "usage": {"prompt_tokens": words, "completion_tokens": completion,
                  "total_tokens": words + completion},
    }


def embedding_list(results: Sequence[Result], *, model: str, encoding: str) -> dict[str, Any]:
    import numpy as np

    data = []
    for i, r in enumerate(results):
        vec = np.asarray(r.vector, dtype="<f4")
        value: Any = (base64.b64encode(vec.tobytes()).decode() if encoding == "base64"
                      else [float(x) for x in vec])
        data.append({"object": "embedding", "index": i, "embedding": value})
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": 0, "total_tokens": 0}}


# --- other objects ---------------------------------------------------------------------------


def file_object(row: Any) -> dict[str, Any]:
    """A ``files`` row as OpenAI's file object."""
    return {"id": row.id, "object": "file", "bytes": row.size_bytes,
            "created_at": unix(row.created_at), "filename": row.filename,
            "purpose": row.purpose, "status": "processed", "status_details": None,
            "expires_at": None}


def model_list(models: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``loom.api``'s known models as OpenAI's model list (ids are the names jobs take)."""
    return {"object": "list", "data": [model_object(name) for name in models]}


def model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "loom"}
