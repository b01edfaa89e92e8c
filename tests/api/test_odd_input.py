"""Odd input at the API boundary, over real HTTP (uvicorn, PostgreSQL): NaN, Infinity and lone
surrogates, out-of-range seeds, storage keys a store would refuse, webhooks aimed at loopback.
Each is a 4xx naming the field; an unexpected exception is a JSON 500; and the keep-alive
connection that carried the bad request serves the next one."""

from __future__ import annotations

import json
from typing import Any

import pytest

from api_helpers import ServedApp, b64, scene_png
from loom.tasks import SEED_MAX

GOOD = {"task": "generate", "items": [{"prompt": "a small red circle"}]}


def _port(response: Any) -> int:
    """The client-side port of the connection that carried ``response``."""
    return int(response.extensions["network_stream"].get_extra_info("client_addr")[1])


def _error(response: Any, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    return str(body["error"]["message"])


# Raw JSON texts: Python's json module (which FastAPI parses with) accepts all of these.
ODD_BODIES = [
    ('{"task":"generate","items":[{"prompt":"a","metadata":{"x":NaN}}]}', "items[0].metadata"),
    ('{"task":"generate","items":[{"prompt":"a","metadata":{"x":[1,Infinity]}}]}',
     "items[0].metadata"),
    ('{"task":"generate","metadata":{"y":-Infinity},"items":[{"prompt":"a"}]}', "metadata"),
    ('{"task":"generate","params":{"w":NaN},"items":[{"prompt":"a"}]}', "params"),
    ('{"task":"generate","items":[{"prompt":"a\\ud800b"}]}', "items[0].prompt"),
    ('{"task":"vqa","items":[{"image_url":"https://example.com/a.png","question":"\\udfff?"}]}',
     "items[0].question"),
    ('{"task":"generate","items":[{"prompt":"a","metadata":{"\\ud83d":1}}]}',
     "items[0].metadata"),
    ('{"task":"generate","metadata":{"a":["\\udc00"]},"items":[{"prompt":"a"}]}', "metadata"),
]


def test_nan_infinity_and_surrogates_are_422_naming_the_field(served_app: ServedApp) -> None:
    with served_app.client() as c:
        for raw, field in ODD_BODIES:
            r = c.post("/v1/jobs", content=raw.encode(),
                       headers={"Content-Type": "application/json"})
            message = _error(r, 422, "invalid_request")
            assert message.startswith(f"{field}:"), (raw, message)
            ok = c.post("/v1/jobs", json=GOOD)  # same client, same keep-alive connection
            assert ok.status_code == 201, ok.text
            assert _port(ok) == _port(r), "the connection was dropped after a bad request"
        # Multipart: JSON form fields are parsed with the same json module.
        files = [("files", ("a.png", scene_png(1), "image/png"))]
        r = c.post("/v1/jobs/upload", files=files,
                   data={"task": "caption", "params": '{"t": NaN}'})
        assert _error(r, 422, "invalid_request").startswith("params:")
        r = c.post("/v1/jobs/upload", files=files,
                   data={"request": '{"task": "caption", "metadata": {"k": "\\ud800"}}'})
        assert _error(r, 422, "invalid_request").startswith("metadata:")
        assert len(c.get("/v1/jobs").json()["jobs"]) == len(ODD_BODIES)


def test_unexpected_exception_is_a_json_500_and_the_connection_survives(
    served_app: ServedApp,
) -> None:
    def boom() -> None:
        raise RuntimeError("a bug")

    served_app.app.add_api_route("/v1/test-only/boom", boom)
    with served_app.client() as c:
        first = c.get("/v1/jobs")
        assert first.status_code == 200
        r = c.get("/v1/test-only/boom")
        assert r.json() == {"error": {"code": "internal_error",
                                      "message": "internal server error"}}
        assert r.status_code == 500 and "a bug" not in r.text
        after = c.get("/v1/jobs")
        assert after.status_code == 200
        assert _port(first) == _port(r) == _port(after), "the keep-alive connection was reset"


@pytest.mark.parametrize(("body", "field"), [
    ({"params": {"seed": 10**30}}, "params.seed"),
    ({"params": {"seed": -1}}, "params.seed"),
    ({"params": {"seed": "7"}}, "params.seed"),
    ({"params": {"seed": 1.5}}, "params.seed"),
    ({"params": {"seed": SEED_MAX}}, "params.seed"),  # item 1 would use SEED_MAX + 1
    ({"items": [{"prompt": "a", "seed": SEED_MAX + 1}, {"prompt": "b"}]}, "items[0].seed"),
    ({"items": [{"prompt": "a", "seed": 10**30}, {"prompt": "b"}]}, "items[0].seed"),
])
def test_seeds_are_bounded_at_submit(served_app: ServedApp, body: dict[str, Any],
                                     field: str) -> None:
    req = {"task": "generate", "items": [{"prompt": "a"}, {"prompt": "b"}], **body}
    with served_app.client() as c:
        r = c.post("/v1/jobs", json=req)
        assert _error(r, 422, "invalid_request").startswith(f"{field}:")


def test_largest_seeds_are_accepted(served_app: ServedApp) -> None:
    # The run params.seed .. params.seed + len(items) - 1 must fit (the check does not look at
    # which items bring their own seed: one simple rule).
    req = {"task": "generate", "params": {"seed": SEED_MAX - 2},
           "items": [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c", "seed": SEED_MAX}]}
    with served_app.client() as c:
        r = c.post("/v1/jobs", json=req)
        assert r.status_code == 201, r.text
        items = c.get(f"/v1/jobs/{r.json()['id']}/items").json()["items"]
    assert [i["input"]["seed"] for i in items] == [SEED_MAX - 2, SEED_MAX - 1, SEED_MAX]


def test_storage_keys_are_validated_like_the_store_does(served_app: ServedApp) -> None:
    tenant = served_app.tenant_ids["alpha"]
    other = served_app.tenant_ids["beta"]
    with served_app.client() as c:
        for key in (f"{tenant}/%2e%2e/x.png", f"{tenant}/%2E%2E/%2e%2e/x.png",
                    f"{tenant}/a%2fb.png", f"{tenant}//x.png", f"{tenant}/a/../x.png",
                    f"{tenant}/ä.png"):
            r = c.post("/v1/jobs", json={"task": "caption", "items": [{"image_key": key}]})
            message = _error(r, 422, "invalid_key")
            assert message.startswith("items[0].image_key:"), message
            r = c.post("/v1/jobs", json={"task": "caption", "manifest_key": key})
            assert _error(r, 422, "invalid_key").startswith("manifest_key:")
        # A valid key of another tenant: not found (no hint that it exists).
        r = c.post("/v1/jobs", json={"task": "caption",
                                     "items": [{"image_key": f"{other}/x.png"}]})
        assert _error(r, 404, "not_found")
        assert c.get("/v1/jobs").json()["jobs"] == []
    assert served_app.published == []


LOOPBACK_WEBHOOKS = [
    "http://127.0.0.1:9/hook", "http://localhost/hook", "http://[::1]:8080/hook",
    "http://2130706433/hook", "http://0x7f.1/hook", "http://127.1/", "http://0.0.0.0/",
    "http://169.254.169.254/latest/meta-data/", "http://[::ffff:127.0.0.1]/",
    "http://10.0.0.1/hook", "file:///etc/passwd", "http://user:pw@93.184.215.14/",
]


@pytest.mark.parametrize("url", LOOPBACK_WEBHOOKS)
def test_webhooks_to_loopback_and_metadata_are_refused_at_submit(
    served_app: ServedApp, url: str
) -> None:
    with served_app.client() as c:
        r = c.post("/v1/jobs", json={**GOOD, "webhook_url": url})
        assert _error(r, 422, "invalid_request").startswith("webhook_url:")
        files = [("files", ("a.png", scene_png(1), "image/png"))]
        r = c.post("/v1/jobs/upload", files=files, data={"task": "caption", "webhook_url": url})
        assert _error(r, 422, "invalid_request").startswith("webhook_url:")


def test_public_webhook_is_accepted(served_app: ServedApp) -> None:
    with served_app.client() as c:
        r = c.post("/v1/jobs", json={**GOOD, "webhook_url": "https://93.184.215.14/hook"})
        assert r.status_code == 201, r.text
        assert r.json()["webhook_url"] == "https://93.184.215.14/hook"


def test_base64_inputs_still_work(served_app: ServedApp) -> None:
    with served_app.client() as c:
        r = c.post("/v1/jobs", json={"task": "caption", "items": [
            {"image_base64": b64(scene_png(2)), "metadata": {"n": 1.5, "s": "ok ✓"}}]})
        assert r.status_code == 201, r.text
        [item] = c.get(f"/v1/jobs/{r.json()['id']}/items").json()["items"]
    assert item["metadata"] == {"n": 1.5, "s": "ok ✓"}
    assert json.dumps(item["input"])  # an image_key the server chose
