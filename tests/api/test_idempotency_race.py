"""Concurrent submissions with one Idempotency-Key (real uvicorn, PostgreSQL, a real store): one
job, and no input objects left behind by the requests that lost the race."""

from __future__ import annotations

import threading

from api_helpers import ServedApp, b64, scene_png


def test_concurrent_idempotent_submissions_leave_no_orphan_inputs(
    served_app: ServedApp,
) -> None:
    body = {"task": "caption", "items": [{"image_base64": b64(scene_png(i))} for i in range(3)]}
    headers = {"Idempotency-Key": "race-1"}
    barrier = threading.Barrier(20)
    answers: list[tuple[int, str]] = []

    def submit() -> None:
        with served_app.client() as c:
            barrier.wait()
            r = c.post("/v1/jobs", json=body, headers=headers)
            answers.append((r.status_code, r.json().get("id", r.text)))

    threads = [threading.Thread(target=submit) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(answers) == 20 and {s for s, _ in answers} <= {200, 201}, answers
    ids = {job_id for _, job_id in answers}
    assert len(ids) == 1, ids
    tenant = served_app.tenant_ids["alpha"]
    store = served_app.app.state.runtime.store
    objects = sorted(key for key, _ in store.list_objects(f"{tenant}/jobs/"))
    [job_id] = ids
    assert objects == [f"{tenant}/jobs/{job_id}/inputs/0000000{i}.png" for i in range(3)], (
        f"{len(objects)} input objects for one job of 3 items")
