"""The worker sends a finished job's webhook itself, off its finisher thread: the job's terminal
transaction wrote the message (loom.jobs.deliveries), the engine's sender posts it signed, and a
slow receiver holds up neither the model nor the job. A real receiver on loopback, let through
the SSRF guard by a policy that pins its port; the real loom-shapes model."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from worker_helpers import make_engine_, tenant_id

from loom import jobs, tenants, webhooks
from loom.fetch import AddressPolicy


class SlowReceiver:
    """Answers each POST 204 after ``delay`` seconds and records (headers, body)."""

    def __init__(self, delay: float) -> None:
        self.received: list[tuple[dict[str, str], str]] = []
        received = self.received

        class Hook(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"])).decode()
                time.sleep(delay)
                received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
        self.server.daemon_threads = True
        self.port = self.server.server_port
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def slow_receiver() -> Iterator[SlowReceiver]:
    r = SlowReceiver(delay=3.0)
    yield r
    r.close()


@pytest.fixture(scope="module")
def shapes() -> Any:
    from pipeline import registry

    return registry.load("loom-shapes", device="cpu")


def test_the_engine_sends_the_completed_webhook_without_waiting_for_it(
    embedded: Any, shapes: Any, slow_receiver: SlowReceiver
) -> None:
    settings, sf, store = embedded
    with sf() as s:
        job = jobs.submit_job(
            s, tenant_id=tenant_id(sf), task="generate", model_name="loom-shapes",
            items=[{"input": {"prompt": "a small red circle", "seed": i}} for i in range(4)],
            chunk_size=4, max_attempts=3,
            webhook_url=f"http://127.0.0.1:{slow_receiver.port}/hook")
        job_id, tenant = job.id, job.tenant_id
    with make_engine_(embedded, shapes) as engine:
        engine.webhooks.policy = AddressPolicy(
            allow=frozenset({("127.0.0.1", slow_receiver.port)}))
        t0 = time.monotonic()
        assert engine.run_job(job_id).status == "succeeded"
        ran = time.monotonic() - t0
        # The job's end did not wait for the receiver's 3 s: the POST is the sender's thread's.
        assert slow_receiver.received == [] and ran < 3.0
    # Closing the engine lets the queued send finish (an embedded run has no reconciler).
    [(headers, body)] = slow_receiver.received
    with sf() as s:
        secret = tenants.webhook_secret(s, tenant_id=tenant)
        [row] = jobs.job_deliveries(s, job_id=job_id)
    assert webhooks.verify(secret, headers, body)
    payload = json.loads(body)
    assert payload["type"] == "job.completed" and payload["job_id"] == job_id
    assert payload["counts"]["succeeded"] == 4
    assert row["status"] == "delivered" and row["attempts"] == 1
