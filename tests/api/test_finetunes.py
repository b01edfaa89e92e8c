"""POST /v1/finetunes over real HTTP on PostgreSQL, through the SDK: rows and images uploaded,
the job recorded and run by an engine on the same database, the version registered for its
tenant only, then run by name with lineage back to the training rows."""

from __future__ import annotations

import io
from typing import Any

import pytest

HYPER = {"steps": 2, "batch": 4, "replay": 1}


def rows(n: int, seed: int) -> list[dict[str, Any]]:
    from pipeline import finetune

    out = []
    for r in finetune.labelled_rows(n, seed=seed):
        buf = io.BytesIO()
        r.image.resize((64, 64)).save(buf, format="PNG")  # under the test API's input limit
        out.append({"image_bytes": buf.getvalue(), "caption": r.caption,
                    "question": r.question, "answer": r.answer})
    return out


def run_engine(served_app: Any, job_id: str) -> str:
    from loom.storage import store_from_settings
    from worker.engine import Engine

    with Engine(served_app.settings, session_factory=served_app.session_factory,
                store=store_from_settings(served_app.settings), worker_id="api-test") as engine:
        return str(engine.run_job(job_id).status)


def test_finetune_over_the_api_registers_a_model_only_its_tenant_runs(served_app: Any) -> None:
    from loom.client import ApiError, Client

    with Client(served_app.url, served_app.keys["alpha"]) as alpha, \
            Client(served_app.url, served_app.keys["beta"]) as beta:
        job = alpha.submit_finetune(rows(8, seed=1), name="shapes-ext", hyper=HYPER,
                                    val_fraction=0.25)
        assert (job["task"], job["item_count"], job["model"]) == ("finetune", 1, "loom-shapes")
        assert served_app.published
        assert run_engine(served_app, job["id"]) == "succeeded"

        mine = {m["name"]: m for m in alpha.models()}
        (version,) = mine["shapes-ext"]["versions"]
        assert version["finetune_job_id"] == job["id"] and version["training_rows"] == 8
        assert "shapes-ext" not in {m["name"] for m in beta.models()}

        pngs = [r["image_bytes"] for r in rows(2, seed=2)]
        from base64 import b64encode

        items = [{"image_base64": b64encode(p).decode()} for p in pngs]
        cap = alpha.submit("caption", items, model="shapes-ext")
        assert cap["model"] == "shapes-ext@v1"  # pinned at submit
        with pytest.raises(ApiError) as err:
            beta.submit("caption", items, model="shapes-ext")
        assert err.value.http_status == 422 and "unknown model" in err.value.message
        assert run_engine(served_app, cap["id"]) == "succeeded"
        item = alpha.items(cap["id"])["items"][0]
        lineage = alpha.lineage(item["id"])
        assert lineage["output"]["model_name"] == "shapes-ext"
        assert lineage["trained_model"]["finetune_job_id"] == job["id"]


@pytest.mark.parametrize(("change", "status", "words"), [
    ({"name": "loom-shapes"}, 422, "built-in"),
    ({"name": "Bad Name"}, 422, "not a model name"),
    ({"base": "nope"}, 422, "unknown model"),
    ({"hyper": {"steps": 0}}, 422, "hyper.steps"),
    ({"hyper": {"epochs": 3}}, 422, "hyper.epochs"),
    ({"val_fraction": 0.9}, 422, "val_fraction"),
])
def test_a_bad_finetune_request_names_the_problem(served_app: Any, change: dict[str, Any],
                                                   status: int, words: str) -> None:
    import httpx

    with served_app.client("alpha") as c:
        up = c.post("/v1/files", data={"purpose": "manifest"}, files={
            "file": ("rows.jsonl", b'{"image_key": "x", "caption": "a red circle"}\n')})
        body = {"rows_key": up.json()["key"], "name": "ok", **change}
        r = c.post("/v1/finetunes", json=body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]
    assert isinstance(r, httpx.Response)


def test_rows_must_be_labelled_rows_of_the_callers_images(served_app: Any) -> None:
    with served_app.client("alpha") as alpha, served_app.client("beta") as beta:
        img = alpha.post("/v1/files", data={"purpose": "image"},
                         files={"file": ("a.png", rows(1, seed=3)[0]["image_bytes"])}).json()
        cases = [
            (f'{{"image_key": "{img["key"]}"}}\n', "needs a caption"),
            ('{"image_key": "someone-else/files/x.png", "caption": "a"}\n', "your uploaded"),
            ("not json\n", "not JSON"),
        ]
        for text, words in cases:
            up = alpha.post("/v1/files", data={"purpose": "manifest"},
                            files={"file": ("rows.jsonl", text.encode())}).json()
            r = alpha.post("/v1/finetunes", json={"rows_key": up["key"], "name": "ok"})
            assert r.status_code == 422 and words in r.json()["error"]["message"], r.text
        # Another tenant's rows file is not found, not read.
        up = alpha.post("/v1/files", data={"purpose": "manifest"}, files={
            "file": ("rows.jsonl", f'{{"image_key": "{img["key"]}", "caption": "a"}}\n'
                     .encode())}).json()
        r = beta.post("/v1/finetunes", json={"rows_key": up["key"], "name": "ok"})
        assert r.status_code == 404


def test_loom_submit_finetune_uploads_a_table(served_app: Any, tmp_path: Any) -> None:
    """The remote CLI: a JSONL table of files becomes uploaded images, a rows manifest and a
    finetune job on the API."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from loom import jobs

    table = tmp_path / "rows.jsonl"
    with table.open("w") as f:
        for i, r in enumerate(rows(4, seed=5)):
            (tmp_path / f"{i}.png").write_bytes(r["image_bytes"])
            f.write(json.dumps({"file": f"{i}.png", "caption": r["caption"]}) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
    env.update({"LOOM_API_URL": served_app.url, "LOOM_API_KEY": served_app.keys["alpha"],
                "LOOM_HOME": str(tmp_path / "home")})
    loom = Path(sys.executable).parent / "loom"
    proc = subprocess.run([str(loom), "submit", "finetune", str(table), "--name", "remote-ext",
                           "--steps", "3"], env=env, capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.split("submitted job ")[1].split()[0]
    with served_app.session_factory() as s:
        job = jobs.get_job(s, job_id=job_id, tenant_id=served_app.tenant_ids["alpha"])
        (item,) = jobs.list_items(s, job_id=job_id).items
    assert job.task == "finetune" and item.input["rows"] == 4
    assert item.input["name"] == "remote-ext" and item.input["hyper"]["steps"] == 3


def test_the_item_page_shows_the_fine_tuned_model(served_app: Any) -> None:
    """The job page's item view: an output of a fine-tuned model names its version, its
    finetune job and the rows it learned from."""
    import httpx

    from loom.client import Client

    with Client(served_app.url, served_app.keys["alpha"]) as alpha:
        job = alpha.submit_finetune(rows(4, seed=12), name="paged", hyper=HYPER,
                                    val_fraction=0.25)
        assert run_engine(served_app, job["id"]) == "succeeded"
        from base64 import b64encode

        img = rows(1, seed=13)[0]["image_bytes"]
        cap = alpha.submit("caption", [{"image_base64": b64encode(img).decode()}], model="paged")
        assert run_engine(served_app, cap["id"]) == "succeeded"
        item = alpha.items(cap["id"])["items"][0]
    with httpx.Client(base_url=served_app.url, timeout=30) as web:
        login = web.post("/ui/login", data={"api_key": served_app.keys["alpha"]})
        assert login.status_code in (200, 303)
        page = web.get(f"/ui/items/{item['id']}")
    assert page.status_code == 200
    assert 'id="trained-model"' in page.text and "paged@v1" in page.text
    assert job["id"][:12] in page.text
