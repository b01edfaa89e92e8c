"""The engine's input stage in-process (SQLite + LocalStore): bad inputs fail alone with their
codes, where inputs are read and decoded, words the model cannot read, and image URLs through the
SSRF guard."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from worker_helpers import (
    FakeModel,
    items_of,
    make_engine_,
    outputs_of,
    png_bomb,
    shape_png,
    submit,
    tenant_id,
    truncated_jpeg,
    upload_inputs,
)


@pytest.mark.parametrize("on_model_thread", [False, True], ids=["io-pool", "model-thread"])
def test_bad_inputs_fail_alone_with_clear_codes(embedded: Any, on_model_thread: bool) -> None:
    import os

    _, sf, store = embedded
    tenant = tenant_id(sf)
    blobs = [shape_png(0), os.urandom(2048), truncated_jpeg(), b"", png_bomb(),
             b"just some text, not an image\n", shape_png(1)]
    keys = upload_inputs(store, tenant, blobs)
    inputs: list[dict[str, Any]] = [{"image_key": k} for k in keys]
    inputs.append({"image_key": f"{tenant}/jobs/nope/inputs/00000000.png"})  # missing object
    inputs.append({})  # no image at all
    job_id = submit(sf, task="caption", inputs=inputs, chunk_size=16, model="fake")
    with make_engine_(embedded, FakeModel(), decode_on_model_thread=on_model_thread) as engine:
        assert engine.run_job(job_id).status == "completed_with_errors"
    got = {it.index: (it.status, it.error_code) for it in items_of(sf, job_id)}
    assert got == {
        0: ("succeeded", None),
        1: ("failed", "invalid_input"),
        2: ("failed", "invalid_input"),
        3: ("failed", "invalid_input"),
        4: ("failed", "input_too_large"),
        5: ("failed", "invalid_input"),
        6: ("succeeded", None),
        7: ("failed", "input_missing"),
        8: ("failed", "invalid_input"),
    }
    assert all(it.error_message for it in items_of(sf, job_id) if it.status == "failed")


@pytest.mark.parametrize("on_model_thread", [False, True], ids=["io-pool", "model-thread"])
def test_inputs_are_decoded_on_the_thread_the_host_plan_names(
    embedded: Any, monkeypatch: pytest.MonkeyPatch, on_model_thread: bool
) -> None:
    """The I/O pool always reads; it decodes too unless the model thread does (a CPU host
    whose cores the model processes fill: worker.sizing.decodes_on_model_thread)."""
    import threading

    from worker import inputs

    real, read_on, decoded_on = inputs.decode, [], []
    real_read = inputs.read_bytes

    def decode(data: bytes, **kwargs: Any) -> Any:
        decoded_on.append(threading.current_thread().name)
        return real(data, **kwargs)

    def read_bytes(item: Any, **kwargs: Any) -> bytes:
        read_on.append(threading.current_thread().name)
        return real_read(item, **kwargs)

    monkeypatch.setattr(inputs, "decode", decode)
    monkeypatch.setattr(inputs, "read_bytes", read_bytes)
    settings, sf, store = embedded
    keys = upload_inputs(store, tenant_id(sf), [shape_png(i) for i in range(40)])
    job_id = submit(sf, task="caption", inputs=[{"image_key": k} for k in keys], chunk_size=16,
                    model="fake")
    model = FakeModel()
    with make_engine_(embedded, model, decode_on_model_thread=on_model_thread) as engine:
        assert engine.run_job(job_id).status == "succeeded"
    assert len(decoded_on) == len(read_on) == 40
    assert all(name.startswith("loom-io") for name in read_on)
    here = threading.current_thread().name  # run_job runs the model on the calling thread
    if on_model_thread:
        assert set(decoded_on) == {here}
    else:
        assert all(name.startswith("loom-io") for name in decoded_on)
    assert len(outputs_of(sf, job_id)) == 40


def test_a_word_the_model_cannot_read_fails_its_item_naming_it(embedded: Any,
                                                             shapes_model: Any) -> None:
    """loom-shapes reads a closed vocabulary: an unknown word would become <unk> and the model
    would draw something unrelated. The item fails invalid_input naming the words; the others in
    its batch succeed."""
    from worker.engine import Engine

    settings, sf, store = embedded
    job_id = submit(sf, task="generate", chunk_size=8, inputs=[
        {"prompt": "a red circle", "seed": 1},
        {"prompt": "the quick brown fox", "seed": 2},
        {"prompt": "a large blue square", "seed": 3},
    ])
    with Engine(settings, session_factory=sf, store=store, worker_id="embedded",
                model_loader=lambda name: shapes_model) as engine:
        job = engine.run_job(job_id)
    assert job.status == "completed_with_errors"
    items = items_of(sf, job_id)
    assert [it.status for it in items] == ["succeeded", "failed", "succeeded"]
    bad = items[1]
    assert bad.error_code == "invalid_input" and bad.attempts == 1
    assert "'quick', 'brown', 'fox' in the prompt" in bad.error_message
    assert "circle" in bad.error_message.split("it knows:")[1]


@pytest.fixture
def http_images() -> Any:
    """A local HTTP server: /ok.png serves a PNG, anything else is a 404."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    body = shape_png(3)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/ok.png":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_error(404)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", body
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize("allow_private", [False, True])
def test_image_urls_go_through_the_ssrf_guard(
    embedded: Any, http_images: Any, allow_private: bool
) -> None:
    from worker.engine import Engine

    settings, sf, store = embedded
    base, body = http_images
    settings = settings.model_copy(update={"allow_private_urls": allow_private})
    job_id = submit(sf, task="caption", model="fake", chunk_size=8,
                    inputs=[{"image_url": f"{base}/ok.png"}, {"image_url": f"{base}/gone.png"}])
    with Engine(settings, session_factory=sf, store=store, worker_id="w",
                model_loader=lambda name: FakeModel()) as engine:
        engine.run_job(job_id)
    got = {it.index: (it.status, it.error_code) for it in items_of(sf, job_id)}
    if not allow_private:  # a loopback address is refused before any connection is made
        assert got == {0: ("failed", "blocked_url"), 1: ("failed", "blocked_url")}
    else:
        assert got == {0: ("succeeded", None), 1: ("failed", "input_missing")}
        (out,) = outputs_of(sf, job_id)
        assert out.input_sha256 == hashlib.sha256(body).hexdigest()
