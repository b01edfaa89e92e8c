"""Helpers for tests that need real processes: a Celery worker subprocess (the production
``worker.app``, real model), the API served by uvicorn in a thread, and the model's weights.

A plain module (tests import it as ``fixtures_worker``; tests/ is on sys.path via rootdir
conftest). tests/worker has its own richer helpers for the worker's own tests.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def missing(what: str) -> None:
    """Skip locally, fail under CI=true (as tests/conftest.py does for services)."""
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.fail(f"{what} is required under CI=true but is unavailable", pytrace=False)
    pytest.skip(f"{what} unavailable")


def require_model(name: str = "loom-shapes") -> None:
    """The shipped weights must be present and match the registry's sha256."""
    from pipeline import registry

    entry = registry.get(name)
    if not entry.path.is_file():
        missing(f"weights {entry.path.name}")
    digest = hashlib.sha256(entry.path.read_bytes()).hexdigest()
    if digest != entry.sha256:
        missing(f"weights {entry.path.name} matching the registry's sha256")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def loom_env(**values: Any) -> dict[str, str]:
    """os.environ without LOOM_* plus ``values`` as LOOM_<NAME> (single-threaded torch)."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
    return {
        **keep,
        **{f"LOOM_{k.upper()}": str(v) for k, v in values.items()},
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(ROOT),
    }


class WorkerProcess:
    """``celery -A worker.app worker -Q loom -c 1`` as a subprocess in its own process group."""

    def __init__(self, env: dict[str, str], log_path: Path, name: str = "w1") -> None:
        self.log_path = log_path
        app = "worker.app"
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", app, "worker", "-Q", "loom",
                 "-c", "1", "-n", f"{name}@%h", "--without-heartbeat", "--without-mingle",
                 "--without-gossip", "--loglevel", "INFO"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def logs(self, tail: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # a pool child that outlived its parent
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """Serve an ASGI app with uvicorn in a thread; yields its base URL."""
    import httpx
    import uvicorn

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                            lifespan="off", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(f"{url}/healthz", timeout=1.0)
            break
        except httpx.HTTPError:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("uvicorn did not start") from None
            time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def wait_for(predicate: Any, *, timeout: float, interval: float = 0.25, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)
