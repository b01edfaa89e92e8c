"""The ``openai:`` backend against a real OpenAI-compatible server: Loom's own front door
(/openai/v1) on PostgreSQL + Redis + S3 with a real worker serving ``loom-shapes``, reached by the
real embedded CLI, directly and through a fault proxy that injects 429 with Retry-After, 500,
connection resets and slow replies. Captions must come back right (the same as the built-in
model run locally), every item finishing exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from api_helpers import Stack
from fault_proxy import FaultProxy

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "images"
LOOM = str(Path(sys.executable).parent / "loom")


def loom(home: Path, *args: str, key: str | None, ok: bool = True,
         extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOOM_", "OPENAI_"))}
    env.update({"LOOM_HOME": str(home), "LOOM_DEVICE": "cpu", "LOOM_RETRY_BACKOFF_SECONDS": "0.2",
                "COLUMNS": "200", **(extra or {})})
    if key is not None:
        env["OPENAI_API_KEY"] = key
    proc = subprocess.run([LOOM, *args], env=env, capture_output=True, text=True, timeout=600,
                          cwd=home)
    if ok:
        assert proc.returncode == 0, f"loom {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def results(home: Path, key: str | None) -> list[dict[str, Any]]:
    job = loom(home, "jobs", key=key).stdout.splitlines()[0].split()[0]
    return [json.loads(line) for line in loom(home, "results", job, key=key).stdout.splitlines()]


@pytest.fixture(scope="module")
def local_captions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """What the built-in model says of the example scenes, run here."""
    home = tmp_path_factory.mktemp("local")
    loom(home, "caption", str(EXAMPLES), "--out", str(home / "c.jsonl"), key=None)
    return {r["file"]: r["caption"] for r in rows(home / "c.jsonl")}


def test_captions_through_an_openai_endpoint_match_the_model_run_here(
    stack: Stack, tmp_path: Path, local_captions: dict[str, str]
) -> None:
    model = f"openai:loom-shapes@{stack.url}/openai/v1"
    loom(tmp_path, "caption", str(EXAMPLES), "--model", model, "--out",
         str(tmp_path / "c.jsonl"), key=stack.keys["alpha"])
    got = {r["file"]: r["caption"] for r in rows(tmp_path / "c.jsonl")}
    assert got == local_captions
    truth = {r["file"]: r["expected_caption"] for r in rows(EXAMPLES / "expected.jsonl")}
    assert sum(got[f] == c for f, c in truth.items()) >= len(truth) - 1
    lineage = results(tmp_path, stack.keys["alpha"])[0]["lineage"]
    assert lineage["weights_sha256"] is None
    assert lineage["details"] == {"endpoint": f"{stack.url}/openai/v1",
                                  "served_model": "loom-shapes", "weights_verified": False,
                                  "finish_reason": "stop"}
    assert stack.keys["alpha"] not in json.dumps(lineage)  # the key is never stored


def test_faults_are_retried_and_every_item_finishes_once(
    stack: Stack, tmp_path: Path, local_captions: dict[str, str]
) -> None:
    def plan(n: int, path: str) -> str:
        return {1: "429", 4: "500", 6: "reset", 9: "slow"}.get(n % 10, "pass")

    with FaultProxy(stack.url, plan) as proxy:
        model = f"openai:loom-shapes@{proxy.url}/openai/v1"
        loom(tmp_path, "caption", str(EXAMPLES), "--model", model, "--out",
             str(tmp_path / "c.jsonl"), key=stack.keys["alpha"])
    got = rows(tmp_path / "c.jsonl")
    assert len(got) == 24 and all(r["status"] == "succeeded" for r in got)
    assert {r["file"]: r["caption"] for r in got} == local_captions
    assert min(proxy.seen[f] for f in ("429", "500", "reset", "slow")) >= 1, proxy.seen
    done = results(tmp_path, stack.keys["alpha"])
    assert all(r["lineage"]["attempt"] >= 1 for r in done) and len(done) == 24


def test_a_refused_key_fails_the_items_and_stops_asking(stack: Stack, tmp_path: Path) -> None:
    with FaultProxy(stack.url, lambda n, path: "pass") as proxy:
        model = f"openai:loom-shapes@{proxy.url}/openai/v1"
        proc = loom(tmp_path, "caption", str(EXAMPLES), "--model", model, "--out",
                    str(tmp_path / "c.jsonl"), key="not-a-key", ok=False)
    assert proc.returncode != 0
    got = rows(tmp_path / "c.jsonl") if (tmp_path / "c.jsonl").exists() else []
    # Refused at load (GET /models) or at the first request: every item failed for good.
    assert all(r["status"] == "failed" for r in got)
    assert all(r["error_code"] in ("model_refused", "unsupported_task") for r in got)
    assert proxy.seen["pass"] <= 4  # not one request per item: the endpoint was stopped


def test_a_reply_outside_the_json_schema_fails_invalid_output_after_one_retry(
    stack: Stack, tmp_path: Path
) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "caption", "schema": {
        "type": "object", "properties": {"caption": {"type": "string"}},
        "required": ["caption"]}}}
    def ignore_format(body: bytes) -> bytes:  # a server that ignores response_format
        request = json.loads(body)
        request.pop("response_format", None)
        return json.dumps(request).encode()

    with FaultProxy(stack.url, lambda n, path: "pass", rewrite=ignore_format) as proxy:
        model = f"openai:loom-shapes@{proxy.url}/openai/v1"
        proc = loom(tmp_path, "caption", str(EXAMPLES / "scene_00.png"), "--model", model,
                    "--param", f"response_format={json.dumps(fmt)}", "--out",
                    str(tmp_path / "c.jsonl"), key=stack.keys["alpha"], ok=False)
    assert proc.returncode == 4, proc.stderr  # nothing succeeded
    [row] = rows(tmp_path / "c.jsonl")
    assert row["error_code"] == "invalid_output" and "not JSON" in row["error_message"]
    assert proxy.seen["pass"] == 1 + 2  # GET /models, then the request and its one retry
