"""Bring your own model, distributed: the API on PostgreSQL + Redis + S3 and a real Celery worker
process run jobs on tiny random-weight models built from configs here (a LLaVA chat VLM, CLIP,
Stable Diffusion), named by their folder on the worker's host (``hf:PATH``, ``diffusers:PATH``).
The API cannot read that folder: it checks the backend's bounds, the worker checks the model's
own declaration and fails what the model cannot do, permanently, naming it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from api_helpers import Stack, b64, scene_png

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
