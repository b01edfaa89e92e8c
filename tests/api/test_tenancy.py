"""Tenancy, route by route, over real HTTP on PostgreSQL: two API keys (alpha, beta); every route
that takes an id answers beta's request for alpha's object exactly as it answers a missing one
(404, the same message), never shows alpha's ids, and changes nothing. Dropping the tenant
filter from any one route fails a test here."""

from __future__ import annotations

import re
from typing import Any

import pytest

from api_helpers import ServedApp, scene_png
from loom import jobs, storage
from loom.errors import InvalidInput
from loom.jobs import ItemFailure, ItemResult

MISSING_JOB = "0" * 32
MISSING_FILE = "file-" + "0" * 32
MISSING_ROW = 987_654_321


@pytest.fixture
def alpha(served_app: ServedApp) -> dict[str, Any]:
    """Alpha's objects: a parent job and a child job with a succeeded image item (an output
    object in the store), a failed item and a running one."""
    with served_app.client("alpha") as c:
        parent = c.post("/v1/jobs", json={"task": "generate", "items": [{"prompt": "p"}]}).json()
        r = c.post("/v1/jobs", json={"task": "generate", "parent_job_id": parent["id"],
                                     "items": [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}]})
        assert r.status_code == 201, r.text
        job = r.json()
    tenant = served_app.tenant_ids["alpha"]
    store = served_app.app.state.runtime.store
    with served_app.session_factory() as s:
        claimed = jobs.claim_items(s, job_id=job["id"], start=0, end=3, worker_id="w",
                                   limit=10, lease_seconds=60)
        data = scene_png(3)
        key = storage.output_key(tenant, job["id"], 0, "png")
        store.put(key, data, "image/png")
        jobs.complete_items(s, worker_id="w", store=store, results=[ItemResult(
            claimed[0].id, "image", storage_key=key, content_type="image/png",
            size_bytes=len(data), model_version="1", weights_sha256="ab" * 32,
            attempt=claimed[0].attempts)])
        jobs.fail_items(s, worker_id="w", backoff_seconds=0, store=store,
                        failures=[ItemFailure(claimed[1].id, InvalidInput("broken"))])
        s.commit()
    with served_app.client("alpha") as c:
        items = c.get(f"/v1/jobs/{job['id']}/items").json()["items"]
        uploaded = c.post("/v1/files", data={"purpose": "image"},
                          files={"file": ("cat.png", scene_png(4), "image/png")})
        assert uploaded.status_code == 201, uploaded.text
        named = c.post("/v1/models", json={"name": "alpha-chat", "backend": "hf",
                                           "ref": "/models/alpha-chat"})
        assert named.status_code == 201, named.text
    output_id = items[0]["output"]["id"]
    return {"job": job["id"], "parent": parent["id"], "item": items[0]["id"],
            "failed_item": items[1]["id"], "output": output_id, "key": key, "tenant": tenant,
            "file": uploaded.json()["id"], "file_key": uploaded.json()["key"],
            "model": "alpha-chat"}


def _same_404(a: Any, b: Any, foreign: str, missing: str) -> None:
    """Both 404 not_found, and the message for the foreign id is the missing one's, id swapped."""
    assert a.status_code == b.status_code == 404, (a.text, b.text)
    ea, eb = a.json()["error"], b.json()["error"]
    assert ea["code"] == eb["code"] == "not_found"
    assert ea["message"] == eb["message"].replace(missing, foreign), (ea, eb)


def _leaks(body: str, alpha: dict[str, Any], *, allowed: tuple[str, ...] = ()) -> list[str]:
    secrets = [alpha["job"], alpha["parent"], alpha["tenant"], alpha["key"], alpha["file"],
               alpha["file_key"]]
    return [s for s in secrets if s in body and s not in allowed]


# (method, path template, which alpha id fills it, the missing id for comparison)
ID_ROUTES = [
    ("GET", "/v1/jobs/{job_id}", "job", MISSING_JOB),
    ("GET", "/v1/jobs/{job_id}/items", "job", MISSING_JOB),
    ("GET", "/v1/jobs/{job_id}/results", "job", MISSING_JOB),
    ("POST", "/v1/jobs/{job_id}/cancel", "job", MISSING_JOB),
    ("POST", "/v1/jobs/{job_id}/retry", "job", MISSING_JOB),
    ("POST", "/v1/jobs/{job_id}/dedupe", "job", MISSING_JOB),
    ("POST", "/v1/jobs/{job_id}/verify", "job", MISSING_JOB),
    ("GET", "/v1/jobs/{job_id}/events", "job", MISSING_JOB),
    ("GET", "/v1/items/{item_id}/lineage", "item", str(MISSING_ROW)),
    ("GET", "/v1/outputs/{output_id}/content", "output", str(MISSING_ROW)),
    ("GET", "/v1/files/{file_id}", "file", MISSING_FILE),
    ("DELETE", "/v1/files/{file_id}", "file", MISSING_FILE),
    ("DELETE", "/v1/models/{name}", "model", "no-such-model"),
]
ADMIN_ID_ROUTES = {("GET", "/v1/admin/tenants/{name}"),
                   ("PATCH", "/v1/admin/tenants/{name}/limits")}


@pytest.mark.parametrize(("method", "template", "which", "missing"), ID_ROUTES)
def test_other_tenants_object_is_a_plain_404(served_app: ServedApp, alpha: dict[str, Any],
                                             method: str, template: str, which: str,
                                             missing: str) -> None:
    foreign = str(alpha[which])
    path = re.sub(r"\{\w+\}", "{}", template)
    with served_app.client("beta") as beta:
        a = beta.request(method, path.format(foreign))
        b = beta.request(method, path.format(missing))
    _same_404(a, b, foreign, missing)
    assert _leaks(a.text, alpha, allowed=(foreign,)) == []
    # Alpha still sees it, unchanged: beta's cancel/retry did nothing.
    with served_app.client("alpha") as c:
        if template.endswith("/events"):  # a live stream: its first event is enough
            with c.stream("GET", path.format(foreign)) as mine:
                assert mine.status_code == 200
                assert next(mine.iter_lines()) == "retry: 2000"
        elif method == "GET":
            mine = c.get(path.format(foreign))
            assert mine.status_code == 200, mine.text
        job = c.get(f"/v1/jobs/{alpha['job']}").json()
        assert c.get(f"/v1/files/{alpha['file']}").status_code == 200  # beta's DELETE did nothing
        assert any(m["name"] == "alpha-chat" for m in c.get("/v1/models").json()["models"])
    assert job["status"] in ("queued", "running") and job["counts"].get("failed") == 1
    assert served_app.app.state.runtime.store.exists(alpha["file_key"])


def test_lineage_of_alpha_item_works_for_alpha(served_app: ServedApp,
                                               alpha: dict[str, Any]) -> None:
    with served_app.client("alpha") as c:
        lin = c.get(f"/v1/items/{alpha['item']}/lineage").json()
    assert lin["job"]["id"] == alpha["job"] and [p["id"] for p in lin["parents"]] == [alpha["parent"]]


def test_lists_show_only_the_callers_jobs(served_app: ServedApp, alpha: dict[str, Any]) -> None:
    with served_app.client("beta") as beta:
        mine = beta.post("/v1/jobs", json={"task": "generate", "items": [{"prompt": "x"}]})
        assert mine.status_code == 201
        listed = beta.get("/v1/jobs")
        files = beta.get("/v1/files")
        assert files.status_code == 200 and _leaks(files.text, alpha) == []
        for status in ("queued", "running", "failed"):
            assert _leaks(beta.get("/v1/jobs", params={"status": status}).text, alpha) == []
        models = beta.get("/v1/models")
    assert [j["id"] for j in listed.json()["jobs"]] == [mine.json()["id"]]
    assert _leaks(listed.text, alpha) == [] and _leaks(models.text, alpha) == []


def test_submit_cannot_reach_into_another_tenant(served_app: ServedApp,
                                                 alpha: dict[str, Any]) -> None:
    with served_app.client("beta") as beta:
        # A parent job of alpha's: the same 404 as a missing one.
        a = beta.post("/v1/jobs", json={"task": "generate", "parent_job_id": alpha["job"],
                                        "items": [{"prompt": "x"}]})
        b = beta.post("/v1/jobs", json={"task": "generate", "parent_job_id": MISSING_JOB,
                                        "items": [{"prompt": "x"}]})
        _same_404(a, b, alpha["job"], MISSING_JOB)
        # Alpha's stored object as an input or a manifest: the same 404 as a missing key.
        missing_key = f"{alpha['tenant']}/jobs/{MISSING_JOB}/outputs/00000000.png"
        for field, body in (("image_key", lambda k: {"task": "caption",
                                                      "items": [{"image_key": k}]}),
                            ("manifest_key", lambda k: {"task": "caption",
                                                         "manifest_key": k})):
            a = beta.post("/v1/jobs", json=body(alpha["key"]))
            b = beta.post("/v1/jobs", json=body(missing_key))
            _same_404(a, b, alpha["key"], missing_key)
        # The idempotency key space is per tenant: alpha's key does not replay alpha's job.
        headers = {"Idempotency-Key": "shared-key"}
        with served_app.client("alpha") as c:
            ja = c.post("/v1/jobs", headers=headers, json={"task": "generate",
                                                           "items": [{"prompt": "x"}]}).json()
        jb = beta.post("/v1/jobs", headers=headers, json={"task": "generate",
                                                          "items": [{"prompt": "x"}]})
        assert jb.status_code == 201 and jb.json()["id"] != ja["id"]
        assert _leaks(jb.text, alpha) == []


def test_every_route_with_an_id_is_covered(served_app: ServedApp) -> None:
    """A new route that takes an id must get a row in ID_ROUTES (and so a cross-tenant test)."""
    spec = served_app.app.openapi()
    with_ids = {(m.upper(), p) for p, ops in spec["paths"].items() if "{" in p for m in ops}
    # The admin routes name tenants, not a tenant's objects: an API key never opens them
    # (tests/api/test_limits_api.py).
    assert {r for r in with_ids if r[1].startswith("/v1/admin/")} == ADMIN_ID_ROUTES
    assert with_ids - ADMIN_ID_ROUTES == {(m, t) for m, t, _, _ in ID_ROUTES}
