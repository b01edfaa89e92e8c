"""The distributed stack from docker-compose, for real: this test starts its own Docker daemon
(no bridge, no iptables), builds a Debian base image with debootstrap and the Loom image from the
Dockerfile (torch from the CPU wheel this machine's pip resolves), starts docker-compose.yml
with deploy/compose.test.yml on loopback, and drives it as a platform team would:

- creates an API key through the API container, submits a 100-item caption job and a 20-item
  generate job over HTTP, and waits for the worker container to finish them;
- fetches the results and an output image, opens Flower's page (basic auth), scrapes /metrics;
- SIGKILLs the worker container mid-job (a 1,500-item generate job) and starts it again:
  every item still finishes once;
- ``docker-compose down -v``, then stops the daemon it started.

Skipped locally when Docker, docker-compose or debootstrap are missing; under CI=true they are
required (``.ci/run`` installs them)."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from fixtures_worker import missing as _missing

ROOT = Path(__file__).resolve().parents[2]
PROJECT = "loomsmoke"
# Tagged with the script's hash, so that a changed script builds a new base (the daemon's
# images persist between runs).
BASE_SCRIPT = ROOT / "deploy" / "test" / "base-image.sh"
BASE_IMAGE = ("local/debian-python:bookworm-"
              + hashlib.sha256(BASE_SCRIPT.read_bytes()).hexdigest()[:12])
STATE = Path("/var/lib/loom-smoke-docker")  # the daemon's images persist between runs (cache)
SOCK = "/run/loom-smoke-docker.sock"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


def _run(args: list[str], env: dict[str, str], timeout: float = 900,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} -> {proc.returncode}\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-4000:]}")
    return proc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def docker_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A Docker daemon of this test's own, stopped (by PID) at the end."""
    for tool in ("dockerd", "docker", "docker-compose", "debootstrap"):
        if shutil.which(tool) is None:
            _missing(tool)
    if os.geteuid() != 0:
        _missing("root (to start dockerd)")
    log = (tmp_path_factory.mktemp("dockerd") / "dockerd.log").open("w")
    STATE.mkdir(parents=True, exist_ok=True)
    daemon = subprocess.Popen(
        ["dockerd", "--bridge=none", "--iptables=false", f"--host=unix://{SOCK}",
         f"--data-root={STATE}", "--exec-root=/run/loom-smoke-docker",
         "--pidfile=/run/loom-smoke-docker.pid"],
        stdout=log, stderr=subprocess.STDOUT)
    env = {**os.environ, "DOCKER_HOST": f"unix://{SOCK}", "COMPOSE_INTERACTIVE_NO_CLI": "1"}
    try:
        deadline = time.monotonic() + 60
        while _run(["docker", "info"], env, check=False).returncode != 0:
            if daemon.poll() is not None or time.monotonic() > deadline:
                log.flush()
                _missing(f"dockerd (did not start: {Path(log.name).read_text()[-2000:]})")
            time.sleep(0.5)
        yield env
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        log.close()


@pytest.fixture(scope="module")
def images(docker_env: dict[str, str]) -> dict[str, str]:
    """The base image (debootstrap), the three stand-ins and the Loom image, built here."""
    _run(["bash", str(BASE_SCRIPT), BASE_IMAGE], docker_env)
    wheels = ROOT / "deploy" / "wheels"
    if not list(wheels.glob("torch-*.whl")):  # the CPU wheel pip resolves on this machine
        _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels),
              "torch==2.13.0"], docker_env)
    for name in ("postgres", "redis", "moto"):
        _run(["docker", "build", "-q", "--network=host", "-t", f"loom-test/{name}:bookworm",
              "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "-f",
              str(ROOT / f"deploy/test/{name}.Dockerfile"), str(ROOT / "deploy/test")],
             docker_env)
    _run(["docker", "build", "-q", "--network=host", "-t", "loom:latest",
          "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", str(ROOT)], docker_env, timeout=1500)
    help_text = _run(["docker", "run", "--rm", "--network=none", "loom:latest", "--help"],
                     docker_env).stdout
    assert "caption" in help_text and "worker" in help_text
    return docker_env


@dataclass
class Stack:
    env: dict[str, str]
    compose: list[str]
    api: str
    flower: str
    key: str = ""

    def __call__(self, *args: str, check: bool = True,
                 timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return _run([*self.compose, *args], self.env, timeout=timeout, check=check)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.api, timeout=30,
                            headers={"Authorization": f"Bearer {self.key}"})


@pytest.fixture(scope="module")
def stack(images: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    ports = {name: _free_port() for name in ("PG", "REDIS", "S3", "API", "FLOWER")}
    values = {
        "LOOM_DATABASE_URL": f"postgresql+psycopg://loom:loom@127.0.0.1:{ports['PG']}/loom",
        "LOOM_BROKER_URL": f"redis://127.0.0.1:{ports['REDIS']}/0",
        "LOOM_S3_ENDPOINT_URL": f"http://127.0.0.1:{ports['S3']}",
        "FLOWER_BASIC_AUTH": "smoke:flower-secret",
        "LOOM_METRICS_TOKEN": "metrics-secret",
        "LOOM_DEVICE": "cpu",
        **{f"LOOM_TEST_{k}_PORT": str(v) for k, v in ports.items()},
    }
    lines = []
    for line in (ROOT / ".env.example").read_text().splitlines():
        name = line.split("=", 1)[0]
        if name not in values:
            lines.append(line)
    lines += [f"{k}={v}" for k, v in values.items()]
    env_file = tmp_path_factory.mktemp("compose") / ".env"
    env_file.write_text("\n".join(lines) + "\n")
    layered = ["docker-compose", "-p", PROJECT, "-f", str(ROOT / "docker-compose.yml"),
               "-f", str(ROOT / "deploy/compose.test.yml"), "--env-file", str(env_file)]
    # The two files merged as compose resolves them, less the published ports of services on
    # the host's network: an override cannot remove list entries, and this Docker refuses
    # port bindings there ("host" network_mode is incompatible with port_bindings).
    merged = yaml.safe_load(_run([*layered, "config"], images).stdout)
    for service in merged["services"].values():
        if service.get("network_mode") == "host":
            service.pop("ports", None)
    resolved = env_file.parent / "docker-compose.resolved.yml"
    resolved.write_text(yaml.safe_dump(merged, sort_keys=False))
    compose = ["docker-compose", "-p", PROJECT, "-f", str(resolved), "--profile", "cpu"]
    s = Stack(images, compose, f"http://127.0.0.1:{ports['API']}",
              f"http://127.0.0.1:{ports['FLOWER']}")
    s("down", "-v", "--remove-orphans", check=False)  # what an interrupted run left behind
    try:
        s("up", "-d", "--no-build", timeout=900)
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{s.api}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("the API did not become ready:\n"
                                     + s("logs", "--tail=50", check=False).stdout[-6000:])
            time.sleep(1)
        # Through the API container, as an operator would.
        created = s("exec", "-T", "api", "loom", "keys", "create", "--tenant", "smoke")
        keys = re.findall(r"^loom_[A-Za-z0-9_-]{20,}$", created.stdout, flags=re.M)
        assert len(keys) == 1, (created.stdout, created.stderr)
        s.key = keys[0]
        with s.client() as c:
            me = c.get("/v1/jobs")
            assert me.status_code == 200, (me.text, created.stdout, created.stderr)
        yield s
    finally:
        logs = s("logs", "--tail=200", check=False).stdout
        s("down", "-v", "--remove-orphans", check=False)
        (tmp_path_factory.getbasetemp() / "compose.log").write_text(logs)


def _scene_b64(i: int) -> str:
    from pipeline import data

    buf = io.BytesIO()
    data.render(data.sample_scene(random.Random(i))).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _wait(c: httpx.Client, job_id: str, timeout: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job  # type: ignore[no-any-return]
        time.sleep(1)
    raise AssertionError(f"job {job_id} did not finish: {job}")


def _items(c: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = c.get(f"/v1/jobs/{job_id}/items",
                     params={"limit": 500, **({"cursor": cursor} if cursor else {})}).json()
        out += page["items"]
        cursor = page.get("next_cursor")
        if not cursor:
            return out


def _exactly_once(c: httpx.Client, job_id: str, n: int) -> None:
    items = _items(c, job_id)
    assert len(items) == n and all(i["status"] == "succeeded" for i in items), items[:3]
    outputs = [i["output"]["id"] for i in items]
    assert len(set(outputs)) == n  # one output per item, none shared or doubled


def test_the_stack_runs_jobs_and_survives_a_worker_kill(stack: Stack) -> None:
    with stack.client() as c:
        caption = c.post("/v1/jobs", json={
            "task": "caption", "items": [{"image_base64": _scene_b64(i)} for i in range(100)]})
        assert caption.status_code == 201, caption.text
        generate = c.post("/v1/jobs", json={
            "task": "generate", "params": {"seed": 7},
            "items": [{"prompt": "a small red circle above a large blue square"}] * 20})
        assert generate.status_code == 201, generate.text
        for job, n in ((caption.json(), 100), (generate.json(), 20)):
            done = _wait(c, job["id"])
            assert done["status"] == "succeeded", done
            _exactly_once(c, job["id"], n)

        results = c.get(f"/v1/jobs/{caption.json()['id']}/results")
        assert results.status_code == 200
        assert len([ln for ln in results.text.splitlines() if ln.strip()]) == 100
        first = _items(c, generate.json()["id"])[0]["output"]
        image = c.get(f"/v1/outputs/{first['id']}/content")
        assert image.status_code == 200 and image.content[:8] == b"\x89PNG\r\n\x1a\n"

        # The worker container dies mid-job (SIGKILL) and is started again. Generated images
        # go to the S3 endpoint one by one, so this job lasts long enough to be interrupted.
        container = stack("ps", "-q", "worker-cpu").stdout.strip()
        n_killed = 1500
        killed = c.post("/v1/jobs", json={
            "task": "generate", "params": {"seed": 11},
            "items": [{"prompt": "a large green square left of a small red circle"}] * n_killed})
        assert killed.status_code == 201, killed.text
        job_id = killed.json()["id"]
        deadline = time.monotonic() + 300
        while (done_before := c.get(f"/v1/jobs/{job_id}").json()["counts"].get(
                "succeeded", 0)) < 20:
            assert time.monotonic() < deadline, "the worker never started on the job"
            time.sleep(0.1)
        _run(["docker", "kill", "--signal=KILL", container], stack.env)
        at_kill = c.get(f"/v1/jobs/{job_id}").json()
        assert at_kill["status"] == "running", at_kill  # it really died mid-job
        assert done_before < n_killed
        stack("up", "-d", "--no-build", "worker-cpu")
        done = _wait(c, job_id)
        assert done["status"] == "succeeded", done
        _exactly_once(c, job_id, n_killed)

    flower_page = httpx.get(stack.flower, timeout=30)
    assert flower_page.status_code == 401  # never served without its basic auth
    flower_page = httpx.get(stack.flower, auth=("smoke", "flower-secret"), timeout=30)
    assert flower_page.status_code == 200 and "Flower" in flower_page.text
    metrics = httpx.get(f"{stack.api}/metrics", timeout=30,
                        headers={"Authorization": "Bearer metrics-secret"})
    assert metrics.status_code == 200 and "loom_items" in metrics.text, metrics.text[:500]
