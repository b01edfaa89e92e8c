"""Python SDK for Loom's HTTP API (httpx). Importable by users::

    from loom.client import Client

    with Client("http://localhost:8000", api_key="loom_...") as loom:
        job = loom.submit("caption", [{"image_url": "https://example.com/a.png"}])
        job = loom.wait(job["id"])
        loom.results_to_file(job["id"], "captions.jsonl")

Errors come back as ``ApiError`` (a ``LoomError``) with the server's ``code`` and ``message``.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import date
from pathlib import Path
from typing import Any

import httpx

from loom import s3
from loom.errors import InputMissing, LoomError

TERMINAL = frozenset({"succeeded", "completed_with_errors", "failed", "cancelled"})


class ApiError(LoomError):
    """An error answer of the API: ``code`` and ``message`` as the server sent them."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message, code=code)
        self.http_status = status

    def __str__(self) -> str:
        return f"{self.code} ({self.http_status}): {self.message}"


def _raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        response.read()
        err = response.json()["error"]
        code, message = str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", response.text[:500] or response.reason_phrase
    raise ApiError(response.status_code, code, message)


class Client:
    """A thin, synchronous client. ``base_url`` / ``api_key`` default to LOOM_API_URL /
    LOOM_API_KEY. ``transport`` lets tests talk to an in-process app."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        base_url = base_url or os.environ.get("LOOM_API_URL")
        if not base_url:
            raise ValueError("no API URL: pass base_url or set LOOM_API_URL")
        api_key = api_key if api_key is not None else os.environ.get("LOOM_API_KEY")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"), headers=headers, timeout=timeout, transport=transport
        )

    # --- plumbing ---------------------------------------------------------------------------

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._http.request(method, path, **kwargs)
        _raise_for(response)
        return response.json()

    # --- jobs -------------------------------------------------------------------------------

    def submit(
        self,
        task: str,
        items: Sequence[dict[str, Any]] | None = None,
        *,
        model: str | None = None,
        params: dict[str, Any] | None = None,
        manifest_key: str | None = None,
        priority: int = 0,
        webhook_url: str | None = None,
        parent_job_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        cache: bool = True,
    ) -> dict[str, Any]:
        """Submit a job (``items`` or ``manifest_key``); returns the job. ``cache=False``: infer
        every item even where an earlier output answers it."""
        body: dict[str, Any] = {"task": task, "params": params or {}, "priority": priority}
        if not cache:
            body["cache"] = False
        for name, value in (
            ("items", list(items) if items is not None else None), ("model", model),
            ("manifest_key", manifest_key), ("webhook_url", webhook_url),
            ("parent_job_id", parent_job_id), ("metadata", metadata),
        ):
            if value is not None:
                body[name] = value
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._call("POST", "/v1/jobs", json=body, headers=headers)  # type: ignore[no-any-return]

    def submit_files(
        self,
        task: str,
        paths: Sequence[str | os.PathLike[str]],
        *,
        names: Sequence[str] | None = None,
        question: str | None = None,
        model: str | None = None,
        params: dict[str, Any] | None = None,
        priority: int = 0,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Upload local images (multipart) as one job; each file's name goes in its metadata."""
        files = []
        for i, p in enumerate(paths):
            name = names[i] if names else Path(p).name
            files.append(("files", (name, Path(p).read_bytes(), "application/octet-stream")))
        data: dict[str, Any] = {"task": task, "priority": str(priority)}
        if question is not None:
            data["question"] = question
        if model:
            data["model"] = model
        if params:
            data["params"] = json.dumps(params)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._call(  # type: ignore[no-any-return]
            "POST", "/v1/jobs/upload", data=data, files=files, headers=headers
        )

    @staticmethod
    def image_item(path: str | os.PathLike[str], **fields: Any) -> dict[str, Any]:
        """An item carrying a local image inline (base64)."""
        data = base64.b64encode(Path(path).read_bytes()).decode()
        return {"image_base64": data, **fields}

    def status(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/jobs/{job_id}")  # type: ignore[no-any-return]

    def jobs(self, *, status: str | None = None, limit: int = 50,
             cursor: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        if cursor:
            params["cursor"] = cursor
        return self._call("GET", "/v1/jobs", params=params)  # type: ignore[no-any-return]

    def items(self, job_id: str, *, status: str | None = None, limit: int = 100,
              cursor: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        if cursor:
            params["cursor"] = cursor
        return self._call("GET", f"/v1/jobs/{job_id}/items", params=params)  # type: ignore[no-any-return]

    def wait(
        self,
        job_id: str,
        *,
        poll_seconds: float = 1.0,
        timeout: float | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll until the job is terminal (TimeoutError after ``timeout`` seconds)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.status(job_id)
            if on_progress is not None:
                on_progress(job)
            if job["status"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout}s")
            time.sleep(poll_seconds)

    def events(self, job_id: str, *, reconnect_seconds: float = 1.0,
               max_reconnects: int = 20) -> Iterator[dict[str, Any]]:
        """The job's live events (Server-Sent Events), as ``{"id", "event", "data"}`` dicts:
        started, progress, item_failed, cancelled, finished (the last one). A dropped
        connection is resumed with ``Last-Event-ID``; ApiError for an unknown job."""
        last_id: str | None = None
        failures = 0
        while True:
            headers = {"Accept": "text/event-stream"}
            if last_id:
                headers["Last-Event-ID"] = last_id
            try:
                with self._http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers,
                                       timeout=httpx.Timeout(10.0, read=60.0)) as response:
                    _raise_for(response)
                    event: dict[str, Any] = {}
                    for line in response.iter_lines():
                        if line.startswith("id:"):
                            event["id"] = line[3:].strip()
                        elif line.startswith("event:"):
                            event["event"] = line[6:].strip()
                        elif line.startswith("data:"):
                            event["data"] = json.loads(line[5:])
                        elif not line and "event" in event:
                            last_id = event.get("id", last_id)
                            failures = 0
                            yield event
                            if event["event"] == "finished":
                                return
                            event = {}
            except (httpx.TransportError, httpx.RemoteProtocolError):
                failures += 1
                if failures > max_reconnects:
                    raise
            time.sleep(reconnect_seconds)

    def results(self, job_id: str, *, format: str = "jsonl",  # noqa: A002
                view: str = "full", drop_images: bool = False) -> Iterator[bytes]:
        """Stream the results export as byte chunks (``view`` "table": the user's columns and
        the task's; ``drop_images``: without a dataset's image column)."""
        params: dict[str, Any] = {"format": format, "view": view}
        if drop_images:
            params["drop_images"] = "true"
        with self._http.stream("GET", f"/v1/jobs/{job_id}/results", params=params) as response:
            _raise_for(response)
            yield from response.iter_bytes()

    def result_rows(self, job_id: str) -> Iterator[dict[str, Any]]:
        """The JSONL results as dicts, one per item."""
        buf = b""
        for chunk in self.results(job_id, format="jsonl"):
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if line.strip():
                    yield json.loads(line)
        if buf.strip():
            yield json.loads(buf)

    def results_to_file(self, job_id: str, path: str | os.PathLike[str], *,
                        format: str = "jsonl") -> Path:  # noqa: A002
        out = Path(path)
        with out.open("wb") as f:
            for chunk in self.results(job_id, format=format):
                f.write(chunk)
        return out

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/jobs/{job_id}/cancel")  # type: ignore[no-any-return]

    def retry(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/jobs/{job_id}/retry")  # type: ignore[no-any-return]

    def dedupe(self, job_id: str, threshold: float | None = None) -> dict[str, Any]:
        """Duplicate groups of an embed job (``POST /v1/jobs/{id}/dedupe``)."""
        params = {} if threshold is None else {"threshold": threshold}
        return self._call("POST", f"/v1/jobs/{job_id}/dedupe",  # type: ignore[no-any-return]
                          params=params)

    def verify(self, job_id: str, *, repair: bool = False) -> dict[str, Any]:
        """Check every output object's existence and sha256; ``repair`` requeues the broken."""
        return self._call(  # type: ignore[no-any-return]
            "POST", f"/v1/jobs/{job_id}/verify", params={"repair": str(repair).lower()}
        )

    def lineage(self, item_id: int) -> dict[str, Any]:
        return self._call("GET", f"/v1/items/{item_id}/lineage")  # type: ignore[no-any-return]

    def models(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/models")["models"]  # type: ignore[no-any-return]

    def add_model(self, name: str, *, backend: str, ref: str,
                  params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Name a model brought by reference for your tenant (``loom models add``)."""
        return self._call("POST", "/v1/models", json={  # type: ignore[no-any-return]
            "name": name, "backend": backend, "ref": ref, "params": params or {}})

    def remove_model(self, name: str) -> None:
        _raise_for(self._http.request("DELETE", f"/v1/models/{name}"))

    def usage(self, *, since: date | str | None = None, until: date | str | None = None,
              model: str | None = None) -> dict[str, Any]:
        """Your tenant's usage per UTC day and model (``GET /v1/usage``; ``since``/``until``
        inclusive, default the last 30 days): ``{tenant, since, until, model, days: [{day,
        model, items, model_seconds, bytes_stored}], total}``."""
        params = {name: str(value) for name, value in
                  (("since", since), ("until", until), ("model", model)) if value is not None}
        return self._call("GET", "/v1/usage", params=params)  # type: ignore[no-any-return]

    # --- files ------------------------------------------------------------------------------

    def upload_file(
        self,
        path: str | os.PathLike[str],
        *,
        purpose: str = "manifest",
        filename: str | None = None,
        content_type: str = "application/octet-stream",
    ) -> dict[str, Any]:
        """Upload a file (streamed from disk); returns the file object: ``id``, ``bytes``,
        ``sha256``, ``key`` (pass a manifest's ``key`` to ``submit(manifest_key=...)``)."""
        p = Path(path)
        with p.open("rb") as f:
            return self._call(  # type: ignore[no-any-return]
                "POST", "/v1/files", data={"purpose": purpose},
                files={"file": (filename or p.name, f, content_type)},
            )

    def upload_bytes(self, data: bytes, *, filename: str, purpose: str = "image",
                     content_type: str = "application/octet-stream") -> dict[str, Any]:
        """Upload bytes as a file; returns the file object (``key`` for ``image_key``)."""
        return self._call(  # type: ignore[no-any-return]
            "POST", "/v1/files", data={"purpose": purpose},
            files={"file": (filename, data, content_type)},
        )

    def submit_dataset(
        self,
        task: str,
        items: Iterable[dict[str, Any]],
        *,
        upload_workers: int = 8,
        s3_endpoint_url: str | None = None,
        **submit_options: Any,
    ) -> dict[str, Any]:
        """Submit a job of any size in bounded requests: each local image is uploaded on its
        own (``image_path`` or ``image_bytes`` in an item; ``upload_workers`` at a time), the
        items go into a JSONL manifest uploaded as one file, and one job is created from it.
        An image the server refuses as an image is uploaded as plain data, so that it fails its
        own item on the worker instead of the submission. An ``image_path`` may be an
        ``s3://bucket/key`` (read here through ``s3_endpoint_url``, else boto3's default)."""
        key = self._upload_manifest(items, upload_workers=upload_workers,
                                    s3_endpoint_url=s3_endpoint_url)
        return self.submit(task, manifest_key=key, **submit_options)

    def _upload_manifest(self, items: Iterable[dict[str, Any]], *, upload_workers: int,
                         s3_endpoint_url: str | None) -> str:
        """Upload each item's local image (``image_path`` / ``image_bytes`` -> ``image_key``),
        write the items as a JSONL manifest, upload it; returns its key."""
        import tempfile
        from concurrent.futures import ThreadPoolExecutor

        def prepared(item: dict[str, Any]) -> dict[str, Any]:
            item = dict(item)
            path, data = item.pop("image_path", None), item.pop("image_bytes", None)
            if path is None and data is None:
                return item
            name = Path(str(path)).name if path is not None else "image"
            try:
                if data is not None:
                    raw = data
                elif str(path).lower().startswith("s3://"):
                    raw = s3.read_uri(str(path), endpoint_url=s3_endpoint_url)
                else:
                    raw = Path(str(path)).read_bytes()
            except (OSError, InputMissing) as exc:  # fails its own item, not the submission
                raw = b""
                reason = exc.message if isinstance(exc, InputMissing) else exc.strerror
                item["metadata"] = {**(item.get("metadata") or {}), "read_error": reason}
            try:
                uploaded = self.upload_bytes(raw, filename=name, purpose="image")
            except ApiError as exc:
                if exc.code != "invalid_request":
                    raise
                uploaded = self.upload_bytes(raw, filename=name, purpose="dataset")
            item["image_key"] = uploaded["key"]
            return item

        with tempfile.TemporaryDirectory() as tmp:
            manifest = Path(tmp) / "manifest.jsonl"
            source = iter(items)
            with manifest.open("w") as f, ThreadPoolExecutor(upload_workers) as pool:
                while window := list(itertools.islice(source, 512)):  # memory stays bounded
                    for item in pool.map(prepared, window):
                        f.write(json.dumps(item, ensure_ascii=False) + "\n")
            return self.upload_file(manifest, purpose="manifest")["key"]  # type: ignore[no-any-return]

    def submit_finetune(
        self,
        rows: Iterable[dict[str, Any]],
        *,
        name: str,
        base: str = "loom-shapes",
        hyper: dict[str, Any] | None = None,
        val_fraction: float = 0.1,
        upload_workers: int = 8,
        s3_endpoint_url: str | None = None,
    ) -> dict[str, Any]:
        """Fine-tune on labelled rows (``image_path`` or ``image_bytes``, with ``caption`` and/or
        ``question`` + ``answer``): images and the rows manifest are uploaded, then one finetune
        job is created. Its result is the registered model ``name`` (``model=name`` after)."""
        key = self._upload_manifest(rows, upload_workers=upload_workers,
                                    s3_endpoint_url=s3_endpoint_url)
        return self._call(  # type: ignore[no-any-return]
            "POST", "/v1/finetunes", json={"rows_key": key, "name": name, "base": base,
                                           "hyper": hyper or {}, "val_fraction": val_fraction})

    def files(self, *, purpose: str | None = None, limit: int = 50,
              cursor: str | None = None) -> dict[str, Any]:
        """One page of your files, newest first: ``{"data": [...], "next_cursor"}``."""
        params: dict[str, Any] = {"limit": limit}
        if purpose:
            params["purpose"] = purpose
        if cursor:
            params["cursor"] = cursor
        return self._call("GET", "/v1/files", params=params)  # type: ignore[no-any-return]

    def file(self, file_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/files/{file_id}")  # type: ignore[no-any-return]

    def delete_file(self, file_id: str) -> dict[str, Any]:
        return self._call("DELETE", f"/v1/files/{file_id}")  # type: ignore[no-any-return]

    def output_content(self, output_id: int) -> bytes:
        response = self._http.get(f"/v1/outputs/{output_id}/content")
        _raise_for(response)
        return response.content

    def download(self, url: str) -> bytes:
        """Fetch an output URL (presigned S3 URL, or this API's content URL with the key)."""
        if url.startswith(str(self._http.base_url)):
            response = self._http.get(url)
        else:
            response = httpx.get(url, timeout=self._http.timeout)
        _raise_for(response)
        return response.content
