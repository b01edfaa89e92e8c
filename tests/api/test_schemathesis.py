"""Property-based: requests generated from the OpenAPI spec (schemathesis) never produce a 5xx,
and every error body has the documented shape."""

from __future__ import annotations

from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings

from api_helpers import LocalApp

EXAMPLES_PER_OPERATION = 10


def test_no_server_errors(local_app: LocalApp) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", local_app.app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 13
    # A real job so that generated ids sometimes hit rows, not only 404s.
    local_app.client.post("/v1/jobs", json={"task": "generate", "items": [{"prompt": "a"}]})
    checked: list[str] = []
    for op in operations:

        @given(case=op.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                  derandomize=True, suppress_health_check=list(HealthCheck))
        def run(case: Any) -> None:
            response = case.call()
            assert response.status_code < 500, (case.method, case.path, response.text[:500])
            ctype = response.headers.get("content-type", "")
            if response.status_code >= 400 and "json" in ctype:
                body = response.json()
                assert set(body) == {"error"} and {"code", "message"} <= set(body["error"]), body

        run()
        checked.append(f"{op.method.upper()} {op.path}")
    assert "POST /v1/jobs" in checked and "POST /v1/jobs/upload" in checked


