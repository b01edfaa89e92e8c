"""What the benchmarks share: the rendered scenes, the `loom` command and its environment, and
the services a distributed run needs (a scratch PostgreSQL database, a Redis DB, a moto_server).
"""
from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MAX_PIXELS = 40_000_000  # Settings.max_image_pixels


def render_inputs(work: Path, n: int, seed: int = 0) -> tuple[list[Path], list[str]]:
    from pipeline import data

    rng = random.Random(seed)
    images = work / "images"
    images.mkdir(parents=True, exist_ok=True)
    paths, prompts = [], []
    for i in range(n):
        scene = data.sample_scene(rng)
        path = images / (f"{i:05d}.png" if i % 2 == 0 else f"{i:05d}.jpg")
        if not path.exists():
            img = data.render(scene)
            if path.suffix == ".png":
                img.save(path)
            else:
                img.save(path, quality=90)
        paths.append(path)
        prompts.append(data.caption(scene))
    (work / "prompts.txt").write_text("\n".join(prompts) + "\n")
    return paths, prompts


def env_for(**loom: Any) -> dict[str, str]:
    """The environment of a `loom` subprocess: this one's without its LOOM_* variables, plus
    ``loom`` as LOOM_* settings, with the project importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.update({f"LOOM_{k.upper()}": str(v) for k, v in loom.items() if v is not None})
    return env


def loom_cmd() -> list[str]:
    script = Path(sys.executable).parent / "loom"
    return [str(script)] if script.exists() else [sys.executable, "-c",
                                                  "from worker.entry import main; main()"]


def stop_worker(worker: subprocess.Popen[bytes]) -> None:
    """SIGTERM the `loom worker` process group (started with start_new_session), then SIGKILL."""
    try:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(worker.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        worker.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Services:
    """A fresh PostgreSQL database, the Redis DB given, and (for s3) a moto_server of our own."""

    def __init__(self, pg_admin: str, redis_url: str) -> None:
        import psycopg

        self.pg_admin = pg_admin
        self.db = f"loom_eta_{secrets.token_hex(4)}"
        with psycopg.connect(pg_admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.db}"')
            user = conn.info.user
            host, port = conn.info.host, conn.info.port
        self.database_url = f"postgresql+psycopg://{user}@{host}:{port}/{self.db}"
        from loom.db import upgrade

        upgrade(self.database_url)
        self.redis_url = redis_url
        self.moto: subprocess.Popen[bytes] | None = None
        self.s3_endpoint: str | None = None

    def start_moto(self) -> str:
        if self.s3_endpoint:
            return self.s3_endpoint
        import httpx

        binary = Path(sys.executable).parent / "moto_server"
        exe = str(binary) if binary.exists() else shutil.which("moto_server")
        if not exe:
            raise RuntimeError("moto_server is not installed (pip install 'moto[server]')")
        port = free_port()
        self.moto = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{url}/moto-api/", timeout=1.0)
                break
            except httpx.HTTPError:
                if self.moto.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)
        for k, v in {"AWS_ACCESS_KEY_ID": "eta", "AWS_SECRET_ACCESS_KEY": "eta",
                     "AWS_DEFAULT_REGION": "us-east-1"}.items():
            os.environ.setdefault(k, v)
        import boto3

        boto3.client("s3", endpoint_url=url).create_bucket(Bucket="eta")
        self.s3_endpoint = url
        return url

    def close(self) -> None:
        if self.moto is not None:
            self.moto.terminate()
            try:
                self.moto.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.moto.kill()
                self.moto.wait()
        import psycopg

        with psycopg.connect(self.pg_admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')


def producer(loom_env: dict[str, Any]) -> tuple[Any, ...]:
    """What a bench needs to submit to a `loom worker` started with ``loom_env``: (settings,
    store, database engine, session factory, Celery app, publish, tenant id)."""
    from loom.config import Settings
    from loom.db import make_engine, make_session_factory
    from loom.storage import store_from_settings
    from loom.tenants import ensure_tenant
    from worker.app import make_celery, make_publisher

    settings = Settings(**{k: v for k, v in loom_env.items() if v is not None})
    db = make_engine(settings.database_url)
    sf = make_session_factory(db)
    celery_app = make_celery(settings)
    with sf() as s:
        tenant = ensure_tenant(s, name="local").id
    return (settings, store_from_settings(settings), db, sf, celery_app,
            make_publisher(celery_app), tenant)
