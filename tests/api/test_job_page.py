"""The job page (/ui) and the event stream (/v1/jobs/{id}/events), end to end.

The API is served by uvicorn over SQLite + a local store with auth on; a real worker Engine runs
the shipped model in a thread. The browser test drives Debian's chromium headless through
Selenium + chromium-driver (missing: skip locally, fail under CI=true).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from api_helpers import b64, scene_png
from fixtures_worker import missing, require_model, serve

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@dataclass
class Site:
    url: str
    settings: Any
    session_factory: Any
    store: Any
    keys: dict[str, str]


@pytest.fixture
def site(tmp_path: Path, make_settings: Any) -> Iterator[Site]:
    from api.main import create_app
    from loom import db, tenants

    require_model()
    settings = make_settings(auth="on", batch_size=4, chunk_batches=2)
    settings.home.mkdir(parents=True, exist_ok=True)
    db.upgrade(settings.database_url)
    engine = db.make_engine(settings.database_url)
    factory = db.make_session_factory(engine)
    keys = {}
    with factory() as s:
        for name in ("acme", "other"):
            keys[name] = tenants.create_api_key(s, tenant_name=name)[1]
    app = create_app(settings, publish=lambda chunk: None)
    rt = app.state.runtime
    with serve(app) as url:
        yield Site(url, settings, factory, rt.store, keys)
    engine.dispose()


def submit(site: Site, n: int, *, key: str = "acme", **extra: Any) -> dict[str, Any]:
    items = [{"image_base64": b64(scene_png(i)), "metadata": {"file": f"{i}.png"}}
             for i in range(n)]
    r = httpx.post(f"{site.url}/v1/jobs", headers={"Authorization": f"Bearer {site.keys[key]}"},
                   json={"task": "caption", "items": items, **extra}, timeout=30)
    assert r.status_code == 201, r.text
    return r.json()


def run_worker(site: Site, job_id: str, *, pause: float = 0.0) -> threading.Thread:
    """A real Engine (shipped model) running the job in a thread; ``pause`` after each batch
    so that a person (or the browser test) can watch it run."""
    from worker.engine import Engine

    engine = Engine(site.settings, session_factory=site.session_factory, store=site.store,
                    worker_id="page-test")
    engine.model("loom-shapes")

    def go() -> None:
        try:
            engine.run_job(job_id, progress=lambda n: time.sleep(pause))
        finally:
            engine.close()

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread


def sse(url: str, key: str, last_event_id: str | None = None) -> list[dict[str, Any]]:
    """Read a whole event stream (it ends after "finished")."""
    headers = {"Authorization": f"Bearer {key}"}
    if last_event_id:
        headers["Last-Event-ID"] = last_event_id
    events, current = [], {}
    with httpx.stream("GET", url, headers=headers, timeout=60) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line:
                if "event" in current:
                    events.append(current)
                current = {}
            elif line.startswith(("id:", "event:", "data:")):
                k, v = line.split(":", 1)
                current[k] = json.loads(v) if k == "data" else v.strip()
    return events


def test_event_stream_live_and_resumed(site: Site) -> None:
    job = submit(site, 12)
    url = f"{site.url}/v1/jobs/{job['id']}/events"
    worker = run_worker(site, job["id"], pause=0.1)
    events = sse(url, site.keys["acme"])
    worker.join(60)
    names = [e["event"] for e in events]
    assert names[-1] == "finished" and "started" in names and "progress" in names
    progress = [e["data"]["done"] for e in events if e["event"] == "progress"]
    assert progress == sorted(progress) and progress[-1] == 12
    assert events[-1]["data"]["status"] == "succeeded"
    assert len({e["id"] for e in events}) == len(events)  # every event has its own id
    # Resume after "started": no second "started", the final progress and "finished" again.
    started = next(e for e in events if e["event"] == "started")
    again = [e["event"] for e in sse(url, site.keys["acme"], started["id"])]
    assert "started" not in again and again[-2:] == ["progress", "finished"]
    # Another tenant's stream is a 404, like its job.
    r = httpx.get(url, headers={"Authorization": f"Bearer {site.keys['other']}"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_cross_tenant_page_item_and_thumbnail_are_404(site: Site) -> None:
    job = submit(site, 2)
    run_worker(site, job["id"]).join(60)
    items = httpx.get(f"{site.url}/v1/jobs/{job['id']}/items",
                      headers={"Authorization": f"Bearer {site.keys['acme']}"}).json()["items"]
    item_id = items[0]["id"]
    paths = [f"/ui/jobs/{job['id']}", f"/ui/items/{item_id}", f"/ui/items/{item_id}/thumb",
             f"/ui/jobs/{job['id']}/data", f"/v1/jobs/{job['id']}/events"]
    for name, expected in (("acme", 200), ("other", 404)):
        with httpx.Client(base_url=site.url, cookies={"loom_key": site.keys[name]}) as c:
            for path in paths:
                r = c.get(path, timeout=30)
                assert r.status_code == expected, (name, path, r.status_code)
    # Not logged in: the page sends you to the login form; the thumbnail is a 401.
    r = httpx.get(f"{site.url}/ui/jobs/{job['id']}")
    assert r.status_code == 303 and r.headers["location"] == "/ui/login"
    assert httpx.get(f"{site.url}/ui/items/{item_id}/thumb").status_code == 401


def _browser() -> Any:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing("the selenium package")
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        missing("Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,1500"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))


def test_job_page_in_a_real_browser(site: Site, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    n = 40
    job = submit(site, n)
    driver = _browser()
    try:
        wait = WebDriverWait(driver, 90, poll_frequency=0.1)
        driver.get(f"{site.url}/ui/login")
        driver.find_element(By.ID, "api_key").send_keys(site.keys["acme"])
        driver.find_element(By.ID, "login").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "a.job-link"))
        worker = run_worker(site, job["id"], pause=0.3)  # the job runs while we open its page
        driver.find_element(By.CSS_SELECTOR, "a.job-link").click()
        wait.until(lambda d: d.find_element(By.ID, "live").text.startswith("live"))
        first = driver.find_element(By.ID, "progress-text").text
        assert first != "100%", "the job finished before its page was open"
        driver.execute_script("window.__sameDocument = true")
        seen: set[str] = set()

        def done(d: Any) -> bool:
            seen.add(d.find_element(By.ID, "progress-text").text)
            return d.find_element(By.ID, "live").text == "finished"

        wait.until(done)
        worker.join(60)
        # Reached 100% in the same document, over SSE, passing through values in between.
        assert driver.find_element(By.ID, "progress-text").text == "100%"
        assert driver.execute_script("return window.__sameDocument") is True
        assert len(seen - {first, "100%"}) >= 1, seen
        assert driver.find_element(By.ID, "status").text == "succeeded"
        # The sample grid (refreshed when the job finished): every thumbnail decoded.
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#samples img")) >= 8)
        wait.until(lambda d: d.execute_script(
            "const imgs = [...document.querySelectorAll('#samples img')];"
            "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0)"))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#chart path.line"))
        wait.until(lambda d: "infer" in d.find_element(By.ID, "stages").text)
        shot = tmp_path / "job-page.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        if os.environ.get("LOOM_UPDATE_SCREENSHOT") == "1":
            shutil.copy(shot, ROOT / "docs" / "job-page.png")
        # An item's lineage: the input thumbnail, the caption, the model, the job chain.
        driver.find_element(By.CSS_SELECTOR, "#samples a.sample").click()
        wait.until(lambda d: d.find_elements(By.ID, "lineage"))
        lineage = driver.find_element(By.ID, "lineage").text
        assert "weights_sha256" in lineage and job["id"][:12] in lineage
        assert driver.find_element(By.ID, "output-text").text
        assert driver.execute_script(
            "const i = document.querySelector('img.big'); return i.complete && i.naturalWidth")
    finally:
        driver.quit()


def test_sdk_events_and_loom_watch_follow_the_stream(site: Site) -> None:
    from typer.testing import CliRunner

    from loom.client import ApiError, Client
    from worker.cli import app

    job = submit(site, 8)
    worker = run_worker(site, job["id"], pause=0.1)
    with Client(site.url, site.keys["acme"]) as c:
        events = list(c.events(job["id"]))
        worker.join(60)
        assert events[-1]["event"] == "finished" and events[-1]["data"]["done"] == 8
        with pytest.raises(ApiError) as err:
            list(c.events("0" * 32))
        assert err.value.http_status == 404
    result = CliRunner().invoke(app, ["watch", job["id"], "--api", site.url,
                                      "--api-key", site.keys["acme"]])
    assert result.exit_code == 0, result.output
    assert "succeeded" in result.output


def test_loom_ui_serves_the_embedded_database_on_loopback(tmp_path: Path) -> None:
    """`loom ui`: the same pages over LOOM_HOME's SQLite and store, auth off, 127.0.0.1 only."""
    import socket
    import subprocess
    import sys

    from fixtures_worker import free_port
    from loom import db, jobs, tenants

    home = tmp_path / "home"
    home.mkdir()
    url = f"sqlite:///{home}/loom.db"
    db.upgrade(url)
    engine = db.make_engine(url)
    with db.make_session_factory(engine)() as s:
        tenant = tenants.ensure_tenant(s, name=tenants.DEFAULT_TENANT)
        s.commit()
        job = jobs.submit_job(s, tenant_id=tenant.id, task="generate", model_name="loom-shapes",
                              items=[{"input": {"prompt": "a red circle", "seed": 1}}],
                              chunk_size=8, max_attempts=3)
    engine.dispose()
    port = free_port()
    env = {**os.environ, "LOOM_HOME": str(home), "LOOM_DATABASE_URL": url, "LOOM_AUTH": "on"}
    proc = subprocess.Popen([sys.executable, "-c", "from worker.cli import app; app()", "ui",
                             "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/ui/jobs", timeout=2)
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
        assert r.status_code == 200 and job.id[:12] in r.text  # auth off for the local tenant
        assert httpx.get(f"http://127.0.0.1:{port}/ui/jobs/{job.id}").status_code == 200
        # Bound to loopback only: another local address of this machine is not served.
        other = socket.gethostbyname(socket.gethostname())
        if not other.startswith("127."):
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"http://{other}:{port}/ui/jobs", timeout=2)
    finally:
        proc.terminate()
        proc.wait(timeout=15)
