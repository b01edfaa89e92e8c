"""Webhooks go through the SSRF guard (loom.fetch) when they are sent (loom.webhooks.post_guarded):
every hop resolved and checked, the connection made to the checked address. Real local HTTP
servers count what reaches them."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from loom import webhooks
from loom.errors import LoomError
from loom.fetch import WEBHOOK_POLICY, AddressPolicy


@dataclass
class Hook:
    port: int = 0
    posts: list[tuple[str, str | None, bytes]] = field(default_factory=list)  # path, Host, body

    def url(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


def _serve(hook: Hook) -> Iterator[Hook]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _any(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            hook.posts.append((self.path, self.headers.get("Host"), body))
            parts = urlsplit(self.path)
            q = {k: v[0] for k, v in parse_qs(parts.query).items()}
            if parts.path == "/redirect":
                self.send_response(int(q.get("code", "307")))
                self.send_header("Location", q["to"])
            else:
                self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_POST = _any  # noqa: N815
        do_GET = _any  # noqa: N815

    class Server(ThreadingHTTPServer):
        daemon_threads = True

    httpd = Server(("127.0.0.1", 0), Handler)
    hook.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield hook
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture
def hook() -> Iterator[Hook]:
    yield from _serve(Hook())


@pytest.fixture
def trap() -> Iterator[Hook]:
    yield from _serve(Hook())


def _send(url: str, payload: dict[str, object], *, policy: AddressPolicy = WEBHOOK_POLICY,
          timeout: float = 5.0) -> bool:
    """One signed POST as loom.webhooks.send_due makes it; True on a 2xx answer."""
    body = json.dumps(payload)
    headers = webhooks.signed_headers("whsec_" + "A" * 32, "msg_1", body)
    try:
        code = webhooks.post_guarded(url, body.encode(), headers, policy=policy, timeout=timeout)
    except LoomError:
        return False
    return 200 <= code < 300


def _only(hook: Hook) -> AddressPolicy:
    return AddressPolicy(allow_private=False, allow=frozenset({("127.0.0.1", hook.port)}))


def test_webhook_is_posted_to_an_allowed_address(hook: Hook) -> None:
    assert _send(hook.url(), {"counts": {"succeeded": 2}}, policy=_only(hook)) is True
    [(path, host, body)] = hook.posts
    assert path == "/hook" and host == f"127.0.0.1:{hook.port}"
    assert json.loads(body) == {"counts": {"succeeded": 2}}


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "2130706433", "0x7f000001", "127.1",
                                  "[::1]", "[::ffff:127.0.0.1]"])
def test_webhook_to_loopback_is_never_posted(trap: Hook, host: str) -> None:
    # The default (production) policy: whatever the spelling, the trap gets nothing.
    assert _send(trap.url(host=host), {}) is False
    assert trap.posts == []


def test_webhook_to_metadata_address_is_refused() -> None:
    assert _send("http://169.254.169.254/latest/meta-data/", {}, timeout=2) is False


def test_every_redirect_hop_is_checked(hook: Hook, trap: Hook) -> None:
    # The allowed endpoint redirects (307: POST again) to the trap, which the policy refuses.
    to = trap.url("/stolen")
    url = hook.url(f"/redirect?code=307&to={to}")
    assert _send(url, {}, policy=_only(hook)) is False
    assert len(hook.posts) == 1 and trap.posts == []
    # A redirect to another allowed path is followed, and POSTs the body again.
    url = hook.url(f"/redirect?code=308&to={hook.url('/final')}")
    assert _send(url, {"counts": {"failed": 1}}, policy=_only(hook)) is True
    assert [p for p, _, _ in hook.posts[1:]] == [f"/redirect?code=308&to={hook.url('/final')}",
                                                  "/final"]
    assert json.loads(hook.posts[-1][2])["counts"] == {"failed": 1}
