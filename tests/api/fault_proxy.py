"""A fault-injecting HTTP proxy on loopback, in front of a real server: the way an overloaded or
flaky model server behaves. Each request is forwarded, or, as the plan says for that request
number, answered 429 with Retry-After, answered 500, reset (the connection closed with no
answer) or delayed. It counts what it saw, so a test can tell the faults really happened."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

# A plan: request number (from 0) -> "429" | "500" | "reset" | "slow" | "pass"
Plan = Callable[[int, str], str]


class FaultProxy:
    def __init__(self, target: str, plan: Plan, *, retry_after: float = 1.0,
                 slow_seconds: float = 1.5,
                 rewrite: Callable[[bytes], bytes] | None = None) -> None:
        """``rewrite``: what the proxy does to each forwarded request body (a server that
        ignores a field, say)."""
        self.target = target.rstrip("/")
        self.plan = plan
        self.seen: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self._n = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy._lock:
                    n = proxy._n
                    proxy._n += 1
                    proxy.in_flight += 1
                    proxy.max_in_flight = max(proxy.max_in_flight, proxy.in_flight)
                try:
                    fault = proxy.plan(n, self.path) if self.command == "POST" else "pass"
                    proxy.seen[fault] += 1
                    if fault == "reset":
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                    if fault in ("429", "500"):
                        payload = b'{"error": {"message": "injected", "type": "server_error"}}'
                        self.send_response(int(fault))
                        if fault == "429":
                            self.send_header("Retry-After", f"{retry_after:g}")
                        self.send_header("Content-Type", "application/json")
                        self.send_header("Content-Length", str(len(payload)))
                        self.end_headers()
                        self.wfile.write(payload)
                        return
                    if fault == "slow":
                        time.sleep(slow_seconds)
                    headers = {k: v for k, v in self.headers.items()
                               if k.lower() in ("authorization", "content-type")}
                    if rewrite is not None and body:
                        body = rewrite(body)
                    with httpx.Client(timeout=120) as client:
                        r = client.request(self.command, proxy.target + self.path,
                                           content=body, headers=headers)
                    self.send_response(r.status_code)
                    self.send_header("Content-Type", r.headers.get("content-type", "text/plain"))
                    self.send_header("Content-Length", str(len(r.content)))
                    self.end_headers()
                    self.wfile.write(r.content)
                finally:
                    with proxy._lock:
                        proxy.in_flight -= 1

            do_GET = _any  # noqa: N815
            do_POST = _any  # noqa: N815

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
