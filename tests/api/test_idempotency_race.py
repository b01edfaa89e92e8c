"""Concurrent submissions with one Idempotency-Key (real uvicorn, PostgreSQL, a real store): one
job, and no input objects left behind by the requests that lost the race."""

from __future__ import annotations

import threading
from pathlib import Path

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
    root = Path(served_app.settings.storage_url.removeprefix("file://"))
    tenant = served_app.tenant_ids["alpha"]
    folders = sorted(p.name for p in (root / tenant / "jobs").iterdir())
    assert folders == list(ids), f"{len(folders)} job folders for one job"
    inputs = sorted(p.name for p in (root / tenant / "jobs" / folders[0] / "inputs").iterdir())
    assert inputs == ["00000000.png", "00000001.png", "00000002.png"]
