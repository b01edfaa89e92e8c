"""Bring your own model, distributed: the API on PostgreSQL + Redis + S3 and a real Celery worker
process run jobs on tiny random-weight models built from configs here (a LLaVA chat VLM, CLIP,
Stable Diffusion), named by their folder on the worker's host (``hf:PATH``, ``diffusers:PATH``).
The API cannot read that folder: it checks the backend's bounds, the worker checks the model's
own declaration and fails what the model cannot do, permanently, naming it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_helpers import Stack, b64, scene_png
from fault_proxy import FaultProxy
from test_openai_backend import loom, rows as jsonl_rows

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipeline"))
pytest.importorskip("transformers")
pytest.importorskip("diffusers")

TIMEOUT = 240.0


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from test_diffusers import build_sd
    from test_hf_chat import build_llava
    from test_hf_embed import build_clip

    root = tmp_path_factory.mktemp("tiny-models")
    return {"llava": build_llava(root / "llava"), "clip": build_clip(root / "clip"),
            "sd": build_sd(root / "sd")}


def _run(stack: Stack, task: str, items: list[dict[str, Any]], **opts: Any) -> tuple[
        dict[str, Any], list[dict[str, Any]]]:
    with stack.client() as c:
        job = c.submit(task, items, **opts)
        try:
            done = c.wait(job["id"], poll_seconds=0.5, timeout=TIMEOUT)
        except TimeoutError:
            pytest.fail(f"{c.status(job['id'])}\n{stack.worker.logs()}")
        return done, list(c.result_rows(job["id"]))


def test_a_chat_vlm_with_a_templated_prompt(stack: Stack, models: dict[str, Path]) -> None:
    items = [{"image_base64": b64(scene_png(i)), "metadata": {"shape": s}}
             for i, s in enumerate(["circle", "square", None])]
    job, rows = _run(stack, "caption", items, model=f"hf:{models['llava']}",
                     params={"prompt": "Describe the {shape}", "max_new_tokens": 4})
    assert job["status"] == "completed_with_errors"
    assert [r["status"] for r in rows] == ["succeeded", "succeeded", "failed"]
    assert rows[2]["error"]["code"] == "invalid_input"
    assert rows[0]["lineage"]["details"]["prompt"] == "Describe the circle"
    assert 1 <= len(rows[0]["output"]["text"].split()) <= 4


def test_the_worker_refuses_what_the_folder_cannot_do(
    stack: Stack, models: dict[str, Path]
) -> None:
    # hf: may caption as far as the API knows; this folder is CLIP: the worker says no.
    job, rows = _run(stack, "caption", [{"image_base64": b64(scene_png(1))}],
                     model=f"hf:{models['clip']}")
    assert job["status"] == "failed"
    assert rows[0]["error"]["code"] == "unsupported_task"
    assert rows[0]["item_id"] and "caption" in rows[0]["error"]["message"]


def test_clip_embeds_and_diffusers_draws(stack: Stack, models: dict[str, Path]) -> None:
    job, rows = _run(stack, "embed", [{"image_base64": b64(scene_png(i))} for i in range(3)],
                     model=f"hf:{models['clip']}")
    assert job["status"] == "succeeded" and all(r["output"]["kind"] == "vector" for r in rows)
    job, rows = _run(stack, "generate", [{"prompt": "a red circle", "seed": 3}] * 2,
                     model=f"diffusers:{models['sd']}",
                     params={"num_inference_steps": 2, "width": 64, "height": 64})
    assert job["status"] == "succeeded"
    # The same seed twice: the same bytes (and one inference: the second is deduplicated).
    assert rows[0]["output"]["sha256"] == rows[1]["output"]["sha256"]
    assert rows[0]["lineage"]["model"] == f"diffusers:{models['sd']}"


def test_a_tenants_named_model(stack: Stack, models: dict[str, Path]) -> None:
    with stack.client() as c:
        added = c.add_model("chat", backend="hf", ref=str(models["llava"]),
                            params={"max_new_tokens": 2})
        assert added["ref"] == f"hf:{models['llava']}" and "caption" in added["tasks"]
        assert any(m["name"] == "chat" for m in c.models())
    with stack.client("beta") as other:  # a name is its tenant's alone
        assert not any(m["name"] == "chat" for m in other.models())
    job, rows = _run(stack, "caption", [{"image_base64": b64(scene_png(4))}], model="chat")
    assert job["model"] == f"hf:{models['llava']}" and job["params"] == {"max_new_tokens": 2}
    assert 1 <= len(rows[0]["output"]["text"].split()) <= 2
    with stack.client() as c:
        c.remove_model("chat")
        assert not any(m["name"] == "chat" for m in c.models())


def test_n_choices_through_the_openai_backend_and_front_door(
    stack: Stack, models: dict[str, Path], tmp_path: Path
) -> None:
    """n outputs per item end to end: Loom's `openai:` backend asks Loom's own front door for
    n choices per request, the front door runs one item with n outputs on the chat VLM, and
    the choices come back as the client's one row per input."""
    with stack.client() as c:
        c.add_model("chat-n", backend="hf", ref=str(models["llava"]))
    try:
        body = {"model": "chat-n", "n": 3, "temperature": 1.0, "seed": 5, "max_tokens": 3,
                "messages": [{"role": "user", "content": [
                    {"type": "image_url",
                     "image_url": {"url": "data:image/png;base64," + b64(scene_png(2))}},
                    {"type": "text", "text": "Describe it."}]}]}
        reply = httpx.post(f"{stack.url}/openai/v1/chat/completions", json=body, timeout=TIMEOUT,
                           headers={"Authorization": f"Bearer {stack.keys['alpha']}"})
        assert reply.status_code == 200, reply.text
        choices = reply.json()["choices"]
        assert [ch["index"] for ch in choices] == [0, 1, 2]
        assert all(1 <= len(ch["message"]["content"].split()) <= 3 for ch in choices)

        images = []
        for i in (1, 3):
            images.append(tmp_path / f"scene_{i}.png")
            images[-1].write_bytes(scene_png(i))
        out = tmp_path / "c.jsonl"
        loom(tmp_path, "caption", *map(str, images), "--model",
             f"openai:chat-n@{stack.url}/openai/v1", "--param", "n=2", "--param",
             "temperature=1.0", "--param", "seed=5", "--param", "max_new_tokens=3", "--out",
             str(out), key=stack.keys["alpha"])
        got = jsonl_rows(out)
        assert len(got) == 2
        for r in got:
            assert len(r["choices"]) == 2 and r["caption"] == r["choices"][0]
        job = loom(tmp_path, "jobs", key=None).stdout.splitlines()[0].split()[0]
        full = json.loads(loom(tmp_path, "results", job, key=None).stdout.splitlines()[0])
        assert full["lineage"]["details"]["choices"] == got[0]["choices"]
        assert full["lineage"]["details"]["served_model"] == "chat-n"

        # A server that ignores n (the proxy drops it): one choice back for two asked, which
        # fails the item model_refused at once, naming it, rather than retrying.
        def drop_n(body: bytes) -> bytes:
            return json.dumps({k: v for k, v in json.loads(body).items() if k != "n"}).encode()

        with FaultProxy(stack.url, lambda n, path: "pass", rewrite=drop_n) as proxy:
            proc = loom(tmp_path, "caption", str(images[0]), "--model",
                        f"openai:chat-n@{proxy.url}/openai/v1", "--param", "n=2", "--out",
                        str(tmp_path / "one.jsonl"), key=stack.keys["alpha"], ok=False)
        assert proc.returncode == 4, proc.stderr  # no item succeeded; the run itself ended
        [row] = jsonl_rows(tmp_path / "one.jsonl")
        assert row["error_code"] == "model_refused" and "does not take n" in row["error_message"]
    finally:
        with stack.client() as c:
            c.remove_model("chat-n")
