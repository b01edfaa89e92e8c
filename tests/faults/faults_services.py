"""The fault suite's own services, which it may stop, kill, flush and restart: redis-server, a
PostgreSQL cluster (initdb into a temp dir), moto_server, a loopback trap server, and Celery
worker processes. Each runs on a free port, in its own process group, and is stopped or killed
only by the PID this module started (never by name); the shared servers are never touched.
"""

from __future__ import annotations

import glob
import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fixtures_worker import missing

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up within {timeout}s")
        time.sleep(0.1)


class Service:
    """One server process: start / stop (graceful) / kill (SIGKILL) / restart, by PID."""

    name = "service"

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{self.name}.log"

    def argv(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def popen_kwargs(self) -> dict[str, Any]:
        return {}

    def start(self, timeout: float = 60) -> None:
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} already runs"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                cwd=self.workdir, **self.popen_kwargs(),
            )
        wait_until(self.ready, timeout=timeout, what=self.name)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _signal(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)  # the group we started: the server and its children
        except ProcessLookupError:
            pass

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        if not self.running:
            return
        assert self.proc is not None
        self._signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self._signal(signal.SIGKILL)  # children left behind

    def kill(self) -> None:
        if self.proc is None:
            return
        self._signal(signal.SIGKILL)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass

    def ensure_running(self) -> None:
        if not self.running:
            self.start()


class RedisServer(Service):
    name = "redis"

    def argv(self) -> list[str]:
        exe = shutil.which("redis-server")
        if exe is None:
            missing("redis-server")
        return [str(exe), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.workdir)]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.url, socket_connect_timeout=2, socket_timeout=5)

    def ready(self) -> bool:
        c = self.client()
        try:
            return bool(c.ping())
        finally:
            c.close()

    def flushall(self) -> None:
        c = self.client()
        try:
            c.flushall()
        finally:
            c.close()


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if found:
        return found[-1]
    exe = shutil.which(name)
    if exe is None:
        missing(f"PostgreSQL server binaries ({name})")
    return str(exe)


class PostgresCluster(Service):
    """initdb into a fresh temp dir (owned by ``postgres`` when we are root: initdb refuses to
    run as root), trust auth, no fsync; ``postgres`` itself is the process we start and stop."""

    name = "postgres"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        # Not under pytest's 0700 tmp dirs: the postgres user must reach its data directory.
        self.datadir = Path(tempfile.mkdtemp(prefix="loom-faults-pg-"))
        self.user = "postgres" if os.geteuid() == 0 else None
        if self.user:
            shutil.chown(self.datadir, self.user, self.user)
        subprocess.run(
            [_pg_bin("initdb"), "-D", str(self.datadir), "-U", "postgres", "-A", "trust",
             "-E", "UTF8", "--no-sync"],
            check=True, capture_output=True, **self.popen_kwargs(),
        )

    def popen_kwargs(self) -> dict[str, Any]:
        return {"user": self.user, "cwd": str(self.datadir)} if self.user else {}

    def start(self, timeout: float = 60) -> None:
        assert self.proc is None or self.proc.poll() is not None
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                **({"cwd": str(self.datadir)} | self.popen_kwargs()),
            )
        wait_until(self.ready, timeout=timeout, what=self.name)

    def argv(self) -> list[str]:
        return [_pg_bin("postgres"), "-D", str(self.datadir), "-p", str(self.port),
                "-k", str(self.datadir), "-c", "listen_addresses=127.0.0.1",
                "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                "-c", "max_connections=300"]

    def dsn(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/loom"

    def ready(self) -> bool:
        import psycopg

        with psycopg.connect(self.dsn(), connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True

    def create_database(self, name: str = "loom") -> None:
        import psycopg

        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30) -> None:
        super().stop(sig, timeout)  # SIGINT: PostgreSQL's "fast" shutdown

    def cleanup(self) -> None:
        shutil.rmtree(self.datadir, ignore_errors=True)


class MotoServer(Service):
    """moto_server keeps objects in memory: a restart comes back EMPTY (no bucket, no objects),
    like a store restored from nothing."""

    name = "moto"

    def argv(self) -> list[str]:
        exe = Path(sys.executable).with_name("moto_server")
        if not exe.exists():
            found = shutil.which("moto_server")
            if found is None:
                missing("moto_server")
            exe = Path(str(found))
        return [str(exe), "-H", "127.0.0.1", "-p", str(self.port)]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        import urllib.request

        with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1):
            return True

    def create_bucket(self, bucket: str) -> None:
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")
        try:
            s3.create_bucket(Bucket=bucket)
        finally:
            s3.close()


class TrapServer:
    """A loopback HTTP server that counts every request: nothing may ever reach it (image_url and
    webhook_url pointing at loopback must be refused before any connection)."""

    def __init__(self) -> None:
        hits: list[str] = []
        self.hits = hits

        class Handler(http.server.BaseHTTPRequestHandler):
            def _hit(self) -> None:
                hits.append(f"{self.command} {self.path}")
                body = b"\x89PNG\r\n\x1a\n"
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_HEAD = _hit  # noqa: N815

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Worker:
    """``celery -A worker.app worker -c 1`` (prefork: a main process and one pool child) in its
    own process group; SIGKILL / SIGSTOP / SIGCONT go to that group only."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-Q", "loom",
                 "-c", "1", "--pool", "prefork", "-n", f"{self.name}@%h",
                 "--without-heartbeat", "--without-mingle", "--without-gossip",
                 "--loglevel", "INFO"],
                cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.signal(signal.SIGCONT)  # a stopped worker cannot handle SIGTERM
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        self.signal(signal.SIGKILL)  # whatever is left of the group
        if self.proc.poll() is None:
            self.proc.wait(timeout=15)

    def logs(self, tail: int = 3000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return f"--- {self.name} (alive={self.alive}) ---\n{text[-tail:]}"
