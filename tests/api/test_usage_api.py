"""GET /v1/usage and the loom_usage_* series of /metrics, over real HTTP (uvicorn) on PostgreSQL:
two tenants with API keys, jobs run to the end by a stand-in worker (the real claim and
fenced completion). A tenant sees only its own usage; /metrics shows every tenant's, by name,
and only with LOOM_METRICS_TOKEN."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from api_helpers import served_app_with
from loom import jobs
from loom.errors import InvalidInput
from loom.jobs import ItemFailure, ItemResult
from loom.models import utcnow

TOKEN = "usage-metrics-" + "t" * 20
BATCH = {"infer_ms": 80.0, "infer_batch_size": 4.0, "upload_ms": 3.0}


class Served:
    def __init__(self, url: str, factory: Any, keys: dict[str, str], ids: dict[str, str]):
        self.url, self.session_factory, self.keys, self.tenant_ids = url, factory, keys, ids

    def get(self, path: str, tenant: str | None = None, token: str | None = None,
            **params: Any) -> httpx.Response:
        secret = self.keys[tenant] if tenant else token
        headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        return httpx.get(self.url + path, headers=headers, params=params, timeout=30)


@pytest.fixture
def served(pg_url: str, tmp_path: Path, make_settings: Any) -> Iterator[Served]:
    with served_app_with(pg_url, tmp_path, make_settings, metrics_token=TOKEN) as app:
        yield Served(app.url, app.session_factory, app.keys, app.tenant_ids)


def _run(served: Served, job_id: str, n: int, *, size: int, fail_last: bool = False) -> None:
    """What a worker does: claim the job's items, store n outputs (one model call of 4), fail
    the last one for good if asked."""
    with served.session_factory() as s:
        claimed = jobs.claim_items(s, job_id=job_id, start=0, end=n, worker_id="w", limit=n,
                                   lease_seconds=60)
        done = claimed[:-1] if fail_last else claimed
        jobs.complete_items(s, worker_id="w", results=[ItemResult(
            c.id, "image", storage_key=f"t/jobs/{job_id}/outputs/{c.index}.png",
            content_type="image/png", size_bytes=size, timings=BATCH, model_version="1",
            weights_sha256="ab" * 32, attempt=c.attempts) for c in done])
        if fail_last:
            jobs.fail_items(s, worker_id="w", backoff_seconds=0, failures=[
                ItemFailure(claimed[-1].id, InvalidInput("broken"), attempt=claimed[-1].attempts)])


@pytest.fixture
def used(served: Served) -> Served:
    """alpha: 4 generate items through the API (3 succeed, 1 fails) and 2 items of a second
    model, still queued; beta: 2 items, both succeeded, bigger outputs."""
    r = httpx.post(served.url + "/v1/jobs", timeout=30,
                   headers={"Authorization": f"Bearer {served.keys['alpha']}"},
                   json={"task": "generate", "items": [{"prompt": p} for p in "abcd"]})
    assert r.status_code == 201, r.text
    _run(served, r.json()["id"], 4, size=1000, fail_last=True)
    with served.session_factory() as s:
        jobs.submit_job(s, tenant_id=served.tenant_ids["alpha"], task="generate",
                        model_name="other-model", items=[{"input": {"prompt": "x"}}] * 2,
                        chunk_size=8, max_attempts=3)
        beta = jobs.submit_job(s, tenant_id=served.tenant_ids["beta"], task="generate",
                               model_name="loom-shapes", items=[{"input": {"prompt": "y"}}] * 2,
                               chunk_size=8, max_attempts=3)
    _run(served, beta.id, 2, size=50_000)
    return served


def _items(**counts: int) -> dict[str, int]:
    return {"queued": 0, "running": 0, "succeeded": 0, "failed": 0, "cancelled": 0, **counts}


def test_a_tenant_sees_only_its_own_usage(used: Served) -> None:
    today = utcnow().date()
    r = used.get("/v1/usage", "alpha")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tenant"] == {"id": used.tenant_ids["alpha"], "name": "alpha"}
    assert (body["since"], body["until"]) == ((today - timedelta(days=29)).isoformat(),
                                              today.isoformat())
    assert body["days"] == [
        {"day": today.isoformat(), "model": "loom-shapes", "items": _items(succeeded=3, failed=1),
         "model_seconds": 0.06, "bytes_stored": 3000},
        {"day": today.isoformat(), "model": "other-model", "items": _items(queued=2),
         "model_seconds": 0.0, "bytes_stored": 0},
    ]
    assert body["total"] == {"items": _items(succeeded=3, failed=1, queued=2),
                             "model_seconds": 0.06, "bytes_stored": 3000}
    beta = used.get("/v1/usage", "beta").json()
    assert beta["tenant"]["name"] == "beta"
    assert [(d["model"], d["items"], d["bytes_stored"]) for d in beta["days"]] == [
        ("loom-shapes", _items(succeeded=2), 100_000)]
    # A model filter, and a range without the day.
    only = used.get("/v1/usage", "alpha", model="other-model").json()
    assert [d["model"] for d in only["days"]] == ["other-model"] and only["model"] == "other-model"
    past = used.get("/v1/usage", "alpha", since="2020-01-01", until="2020-01-31").json()
    assert past["days"] == [] and past["total"]["items"] == _items()


def test_bad_requests(used: Served) -> None:
    assert used.get("/v1/usage").status_code == 401
    assert used.get("/v1/usage", token=TOKEN).status_code == 401  # the metrics token is no key
    for params, says in (
        ({"since": "2024-02-30"}, "since"),
        ({"until": "yesterday"}, "until"),
        ({"since": "2024-03-02", "until": "2024-03-01"}, "after until"),
        ({"since": "2023-01-01", "until": "2024-03-01"}, "at most 366"),
        ({"until": "9999-12-31"}, "is not between"),
        ({"model": "a\x00b"}, "model"),
    ):
        r = used.get("/v1/usage", "alpha", **params)
        assert r.status_code == 422, (params, r.text)
        error = r.json()["error"]
        assert error["code"] == "invalid_request" and says in error["message"], (params, error)


def test_metrics_show_every_tenants_usage_with_the_token(used: Served) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    assert used.get("/metrics", "alpha").status_code == 401  # an API key does not open it
    r = used.get("/metrics", token=TOKEN)
    assert r.status_code == 200, r.text
    series = {(s.name, *sorted(s.labels.items())): s.value
              for family in text_string_to_metric_families(r.text) for s in family.samples
              if s.name.startswith("loom_usage_")}

    def value(name: str, **labels: str) -> float:
        return series[(name, *sorted(labels.items()))]

    assert value("loom_usage_items", tenant="alpha", model="loom-shapes", status="succeeded") == 3
    assert value("loom_usage_items", tenant="alpha", model="loom-shapes", status="failed") == 1
    assert value("loom_usage_items", tenant="alpha", model="other-model", status="queued") == 2
    assert value("loom_usage_items", tenant="beta", model="loom-shapes", status="succeeded") == 2
    assert value("loom_usage_items", tenant="beta", model="loom-shapes", status="queued") == 0
    assert value("loom_usage_model_seconds", tenant="alpha", model="loom-shapes") == \
        pytest.approx(0.06)
    assert value("loom_usage_model_seconds", tenant="beta", model="loom-shapes") == \
        pytest.approx(0.04)
    assert value("loom_usage_model_seconds", tenant="alpha", model="other-model") == 0
    assert value("loom_usage_bytes_stored", tenant="alpha", model="loom-shapes") == 3000
    assert value("loom_usage_bytes_stored", tenant="beta", model="loom-shapes") == 100_000
    # Bounded: one series per tenant x model (x item status), no per-day or per-job labels.
    names = [key[0] for key in series]
    assert (names.count("loom_usage_items"), names.count("loom_usage_model_seconds"),
            names.count("loom_usage_bytes_stored")) == (3 * 5, 3, 3)
