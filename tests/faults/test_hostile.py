"""A hostile or careless client against the full stack: loopback and metadata URLs, bombs and
truncated files, odd JSON, bad keys, another tenant's ids, concurrent idempotent submissions and
webhooks aimed at loopback. The fixture checks 0 unexpected 5xx and 0 hits on the trap server."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import select

from faults_checks import Stack, b64, check_invariants, png_bomb, scene_png, truncated_jpeg

def loopback_urls(port: int) -> list[str]:
    """17 spellings of loopback, link-local metadata and private addresses."""
    return [
        f"http://127.0.0.1:{port}/a.png", f"http://localhost:{port}/a.png",
        f"http://LOCALHOST:{port}/a.png", f"http://[::]:{port}/a.png",
        f"http://[::1]:{port}/a.png", f"http://2130706433:{port}/a.png",
        f"http://0x7f000001:{port}/a.png", f"http://0177.0.0.1:{port}/a.png",
        f"http://127.1:{port}/a.png", f"http://0.0.0.0:{port}/a.png", f"http://0:{port}/a.png",
        f"http://[::ffff:127.0.0.1]:{port}/a.png", f"http://[0:0:0:0:0:ffff:7f00:1]:{port}/a.png",
        f"http://user:pw@127.0.0.1:{port}/a.png", "http://169.254.169.254/latest/meta-data/",
        f"http://[fe80::1]:{port}/a.png", f"http://10.0.0.1:{port}/a.png",
    ]


def _error_code(response: Any) -> str:
    try:
        return str(response.json()["error"]["code"])
    except Exception:  # noqa: BLE001
        return f"<{response.status_code} {response.text[:200]}>"


def test_loopback_and_metadata_image_urls_are_blocked(scenario: Stack) -> None:
    stack = scenario
    accepted: list[str] = []
    with stack.http() as c:
        for url in loopback_urls(stack.trap.port):
            r = c.post("/v1/jobs", json={"task": "caption", "items": [{"image_url": url}]})
            if r.status_code in (200, 201, 202):
                accepted.append(r.json()["id"])
            else:
                assert r.status_code == 422, (url, r.text)
                assert _error_code(r) in ("blocked_url", "invalid_request"), (url, r.text)
    for job_id in accepted:
        counts = check_invariants(stack, job_id, allow_failed=True)
        assert counts == {"failed": 1}
        with stack.session_factory() as s:
            from loom.models import Item

            code = s.scalar(select(Item.error_code).where(Item.job_id == job_id))
        assert code in ("blocked_url", "invalid_input")  # invalid_input: credentials in URL


def test_bombs_and_truncated_files_fail_their_items_with_clear_codes(scenario: Stack) -> None:
    from loom.models import Item

    stack = scenario
    job = stack.submit("caption", [
        {"image_base64": b64(scene_png(0))},
        {"image_base64": b64(png_bomb())},
        {"image_base64": b64(truncated_jpeg())},
        {"image_base64": b64(scene_png(1))},
    ])
    counts = check_invariants(stack, job["id"], allow_failed=True)
    assert counts == {"succeeded": 2, "failed": 2}
    with stack.session_factory() as s:
        codes = list(s.scalars(select(Item.error_code).where(Item.job_id == job["id"])
                               .order_by(Item.index)))
    assert codes[0] is None and codes[3] is None
    assert codes[1] in ("input_too_large", "invalid_input")
    assert codes[2] == "invalid_input"
    with stack.http() as c:  # not an image at all: refused at submission, naming the item
        r = c.post("/v1/jobs", json={"task": "caption",
                                     "items": [{"image_base64": b64(b"not an image at all")}]})
    assert r.status_code == 422 and "items[0]" in r.json()["error"]["message"]


def _post_raw(stack: Stack, body: str) -> Any:
    with stack.http() as c:
        return c.post("/v1/jobs", content=body.encode("utf-8", "surrogatepass"),
                      headers={"Content-Type": "application/json"})


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_422_naming_the_field(scenario: Stack, literal: str) -> None:
    for where in ("params", "metadata"):
        body = ('{"task": "generate", "items": [{"prompt": "a red circle"}], '
                f'"{where}": {{"x": {literal}}}}}')
        r = _post_raw(scenario, body)
        assert r.status_code == 422, r.text
        assert where in r.json()["error"]["message"]
    with scenario.http() as c:  # the connection and the server are fine afterwards
        assert c.get("/healthz").status_code == 200


def test_a_lone_surrogate_is_422(scenario: Stack) -> None:
    body = '{"task": "generate", "items": [{"prompt": "a red \\ud800 circle"}]}'
    r = _post_raw(scenario, body)
    assert r.status_code == 422, r.text
    assert "prompt" in r.json()["error"]["message"]


def test_an_unbounded_seed_is_refused_at_submit(scenario: Stack) -> None:
    with scenario.http() as c:
        r = c.post("/v1/jobs", json={"task": "generate", "params": {"seed": 10**30},
                                     "items": [{"prompt": "a red circle"}]})
    assert r.status_code == 422, r.text
    assert "seed" in r.json()["error"]["message"]


def test_an_invalid_storage_key_is_refused_at_submit(scenario: Stack) -> None:
    tenant = scenario.tenant_ids["alpha"]
    with scenario.http() as c:
        r = c.post("/v1/jobs", json={"task": "caption",
                                     "items": [{"image_key": f"{tenant}/%2e%2e/x.png"}]})
    assert r.status_code == 422, r.text


@pytest.fixture
def alpha_job(scenario: Stack) -> dict[str, Any]:
    job = scenario.submit("caption", [{"image_base64": b64(scene_png(i))} for i in range(3)])
    check_invariants(scenario, job["id"])
    with scenario.http() as c:
        items = c.get(f"/v1/jobs/{job['id']}/items").json()["items"]
    return {**job, "item_ids": [it["id"] for it in items]}


def test_every_job_route_hides_another_tenants_job(
    scenario: Stack, alpha_job: dict[str, Any]
) -> None:
    job_id = alpha_job["id"]
    with scenario.http("beta") as c:
        for method, path in (("GET", f"/v1/jobs/{job_id}"), ("GET", f"/v1/jobs/{job_id}/items"),
                             ("GET", f"/v1/jobs/{job_id}/results"),
                             ("POST", f"/v1/jobs/{job_id}/cancel"),
                             ("POST", f"/v1/jobs/{job_id}/retry"),
                             ("POST", f"/v1/jobs/{job_id}/verify"),
                             ("POST", f"/v1/jobs/{job_id}/verify?repair=true")):
            r = c.request(method, path)
            assert r.status_code == 404, (method, path, r.text)
        listed = c.get("/v1/jobs").json()["jobs"]
        assert job_id not in [j["id"] for j in listed]
    assert scenario.job_status(job_id) == "succeeded"


def test_lineage_of_another_tenants_item_leaks_nothing(
    scenario: Stack, alpha_job: dict[str, Any]
) -> None:
    with scenario.http("beta") as c:
        foreign = c.get(f"/v1/items/{alpha_job['item_ids'][0]}/lineage")
        absent = c.get("/v1/items/999999999/lineage")
    assert foreign.status_code == absent.status_code == 404
    assert alpha_job["id"] not in foreign.text
    assert foreign.json()["error"]["message"].replace(
        str(alpha_job["item_ids"][0]), "N") == absent.json()["error"]["message"].replace(
        "999999999", "N")


def _idempotent_burst(stack: Stack, key: str, n: int = 20) -> list[Any]:
    items = [{"image_base64": b64(scene_png(i))} for i in range(6)]

    def one(_: int) -> Any:
        with stack.http() as c:
            return c.post("/v1/jobs", json={"task": "caption", "items": items},
                          headers={"Idempotency-Key": key})

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_concurrent_idempotent_submissions_make_one_job(scenario: Stack) -> None:
    answers = _idempotent_burst(scenario, "burst-one")
    assert all(r.status_code in (200, 201, 202) for r in answers), [r.text for r in answers]
    ids = {r.json()["id"] for r in answers}
    assert len(ids) == 1
    check_invariants(scenario, ids.pop())


def test_concurrent_idempotent_submissions_leave_no_orphan_inputs(scenario: Stack) -> None:
    import boto3

    from loom.models import Job

    answers = _idempotent_burst(scenario, "burst-two")
    (job_id,) = {r.json()["id"] for r in answers}
    check_invariants(scenario, job_id)
    tenant = scenario.tenant_ids["alpha"]
    s3 = boto3.client("s3", endpoint_url=scenario.moto.endpoint, region_name="us-east-1")
    try:
        keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=scenario.bucket, Prefix=f"f/{tenant}/jobs/") for o in page.get("Contents", [])]
    finally:
        s3.close()
    folders = {k.split("/")[3] for k in keys if "/inputs/" in k}
    with scenario.session_factory() as s:
        known = set(s.scalars(select(Job.id).where(Job.id.in_(folders))))
    assert folders - known == set(), "input folders without a job row"


def test_webhooks_never_reach_loopback(scenario: Stack) -> None:
    stack = scenario
    before = len(stack.trap.hits)
    accepted: list[str] = []
    try:
        with stack.http() as c:
            for url in loopback_urls(stack.trap.port)[:6]:
                r = c.post("/v1/jobs", json={"task": "generate", "webhook_url": url,
                                             "items": [{"prompt": "a red circle"}]})
                if r.status_code in (200, 201, 202):
                    accepted.append(url)
                    check_invariants(stack, r.json()["id"])
                else:
                    assert r.status_code == 422, r.text
        time.sleep(2)  # webhooks fire after the job's finalisation commits
    finally:
        hits = list(stack.trap.hits[before:])
        del stack.trap.hits[before:]  # reported here; the fixture checks the other scenarios
    assert hits == [] and accepted == [], (hits, accepted)
