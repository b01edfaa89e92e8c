"""The embedded CLI end to end: the ``loom`` console script in subprocesses, SQLite + a local
store under a temporary LOOM_HOME, the real model in-process. Each command records a real job,
so ``loom jobs`` / ``status`` / ``results`` work on it afterwards."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fixtures_worker import require_model

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "images"
LOOM = [str(Path(sys.executable).parent / "loom")]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_model()
    return tmp_path_factory.mktemp("loom-home")


def loom(home: Path, *args: str, ok: bool = True, cwd: Path | None = None,
         env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
    env.update({"LOOM_HOME": str(home), "LOOM_DEVICE": "cpu", "OMP_NUM_THREADS": "1",
                "LOOM_RETRY_BACKOFF_SECONDS": "0.1", "COLUMNS": "200", **(env_extra or {})})
    proc = subprocess.run([*LOOM, *args], cwd=cwd or home, env=env, capture_output=True,
                          text=True, timeout=300)
    if ok:
        assert proc.returncode == 0, f"loom {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def job_ids(home: Path) -> dict[str, list[str]]:
    """task -> job ids (newest first), from `loom jobs` (tab-separated when piped)."""
    out: dict[str, list[str]] = {}
    for line in loom(home, "jobs").stdout.splitlines():
        parts = line.split("\t")
        out.setdefault(parts[1], []).append(parts[0])
    return out


@pytest.fixture(scope="module")
def images(home: Path) -> Path:
    """The bundled examples, a nested folder, and one corrupt file."""
    d = home / "in"
    shutil.copytree(EXAMPLES, d)
    (d / "nested").mkdir()
    shutil.copy(EXAMPLES / "scene_03.png", d / "nested" / "again.png")
    (d / "broken.png").write_bytes(b"this is not a picture")
    return d


def test_caption_directory_with_a_corrupt_file(home: Path, images: Path) -> None:
    out = home / "captions.jsonl"
    proc = loom(home, "caption", str(images), "--out", str(out), ok=False)
    assert proc.returncode == 3, proc.stderr  # finished, with failures: a distinct code
    assert "1 of 26 items did not succeed" in proc.stderr and str(out) in proc.stderr
    got = rows(out)
    assert len(got) == 26
    by_file = {r["file"]: r for r in got}
    assert set(by_file) == {p.relative_to(images).as_posix() for p in images.rglob("*.png")}
    bad = by_file["broken.png"]
    assert bad["caption"] is None and bad["status"] == "failed"
    assert bad["error_code"] == "invalid_input" and bad["error_message"]
    assert all(r["caption"] for f, r in by_file.items() if f != "broken.png")
    summary = proc.stdout
    assert "25 succeeded" in summary and "1 failed" in summary
    assert "broken.png" in summary and "invalid_input" in summary
    expected = {r["file"]: r["expected_caption"] for r in rows(EXAMPLES / "expected.jsonl")}
    right = sum(by_file[f]["caption"] == c for f, c in expected.items())
    assert right >= 22, f"only {right}/24 example captions right"
    assert by_file["nested/again.png"]["caption"] == by_file["scene_03.png"]["caption"]


def test_caption_files_as_csv_and_coco(home: Path) -> None:
    a, b = EXAMPLES / "scene_00.png", EXAMPLES / "scene_01.png"
    loom(home, "caption", str(a), str(b), "--out", str(home / "c.csv"), "--format", "csv")
    table = list(csv.DictReader(io.StringIO((home / "c.csv").read_text())))
    assert [r["file"] for r in table] == [str(a), str(b)] and all(r["caption"] for r in table)
    loom(home, "caption", str(a), "--out", str(home / "c.json"), "--format", "coco")
    coco = json.loads((home / "c.json").read_text())
    assert coco["images"][0]["file_name"] == str(a)
    assert coco["annotations"][0]["caption"] == table[0]["caption"]


def test_ask_questions_file_and_single_question(home: Path) -> None:
    out = home / "answers.jsonl"
    loom(home, "ask", "--questions", str(EXAMPLES / "expected.jsonl"), "--out", str(out))
    got = rows(out)
    assert len(got) == 24 and all(r["answer"] for r in got)
    assert got[0]["file"] == "scene_00.png" and got[0]["question"]  # the row, answer added
    assert sum(r["answer"] == r["expected_answer"] for r in got) >= 22
    proc = loom(home, "ask", str(EXAMPLES / "scene_00.png"), "how many shapes are there?")
    answer = proc.stdout.strip().splitlines()[-1]
    assert answer == "one"


def test_generate_with_seed_and_variants(home: Path) -> None:
    prompts = home / "prompts.txt"
    prompts.write_text("a small red circle\n\na large blue square above a small green triangle\n")
    out = home / "gen"
    loom(home, "generate", "--prompts", str(prompts), "--out", str(out), "--seed", "100",
         "--variants", "3")
    index = rows(out / "index.jsonl")
    assert [r["seed"] for r in index] == list(range(100, 106))
    assert [r["file"] for r in index] == [f"{i:05d}.png" for i in range(6)]
    assert [r["prompt"] for r in index] == ["a small red circle"] * 3 + [
        "a large blue square above a small green triangle"] * 3
    first = [(out / r["file"]).read_bytes() for r in index]
    assert all(b.startswith(b"\x89PNG") for b in first)
    # Same seed, same images; the seed is in the lineage.
    loom(home, "generate", "--prompts", str(prompts), "--out", str(home / "gen2"), "--seed",
         "100", "--variants", "3")
    assert [(home / "gen2" / r["file"]).read_bytes() for r in index] == first
    job = job_ids(home)["generate"][0]
    results = [json.loads(line) for line in loom(home, "results", job).stdout.splitlines()]
    assert [r["lineage"]["seed"] for r in results] == list(range(100, 106))
    assert len({hashlib.sha256(b).hexdigest() for b in first[:3]}) == 3
    # One prompt, no seed: a random one is printed and recorded.
    proc = loom(home, "generate", "a small red circle", "--out", str(home / "one"))
    seed = int(proc.stderr.split("seed: ")[1].split()[0])
    assert rows(home / "one" / "index.jsonl") == [
        {"prompt": "a small red circle", "file": "00000.png", "seed": seed,
         "status": "succeeded", "error_code": None, "error_message": None}]


def test_jobs_status_and_results_afterwards(home: Path) -> None:
    ids = job_ids(home)
    assert {"caption", "vqa", "generate"} <= set(ids)
    caption_job = ids["caption"][-1]  # the first one: the directory with broken.png
    status = loom(home, "status", caption_job).stdout
    assert "completed_with_errors" in status and "broken.png" in status
    as_json = json.loads(loom(home, "status", caption_job, "--json").stdout)
    assert as_json["counts"]["failed"] == 1 and as_json["counts"]["succeeded"] == 25
    loom(home, "results", caption_job, "--format", "csv", "-o", str(home / "r.csv"))
    table = list(csv.DictReader(io.StringIO((home / "r.csv").read_text())))
    assert len(table) == 26 and {r["status"] for r in table} == {"succeeded", "failed"}
    coco = json.loads(loom(home, "results", caption_job, "-f", "coco").stdout)
    assert len(coco["images"]) == 26 and len(coco["annotations"]) == 25
    # The embedded command wrote its file through the same exporter, in the task's columns.
    table_view = loom(home, "results", caption_job, "--view", "table").stdout.splitlines()
    assert [json.loads(line) for line in table_view] == rows(home / "captions.jsonl")
    missing = loom(home, "status", "no-such-job", ok=False)
    assert missing.returncode == 1 and "no job" in missing.stderr


def test_bad_invocations_fail_clearly(home: Path) -> None:
    proc = loom(home, "caption", str(home / "nowhere"), ok=False)
    assert proc.returncode != 0 and "no such file or directory" in proc.stderr
    proc = loom(home, "ask", ok=False)
    assert proc.returncode != 0 and "--questions" in proc.stderr
    proc = loom(home, "results", "x", "--format", "xml", ok=False)
    assert proc.returncode != 0 and "--format" in proc.stderr


def test_exit_codes_and_job_id_prefixes(home: Path, tmp_path: Path) -> None:
    """0 all succeeded, 3 finished with failures (above), 4 nothing succeeded, 1 nothing could
    start; an unknown model is refused before any job is recorded; 8-character prefixes of a
    job id resolve wherever an id is taken."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"not an image")
    (bad / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    proc = loom(home, "caption", str(bad), "--out", str(tmp_path / "bad.jsonl"), ok=False)
    assert proc.returncode == 4, proc.stderr
    assert "2 of 2 items did not succeed" in proc.stderr
    before = job_ids(home)
    proc = loom(home, "caption", str(EXAMPLES / "scene_00.png"), "--model", "no-such-model",
                ok=False)
    assert proc.returncode == 1 and "unknown model 'no-such-model'" in proc.stderr
    assert job_ids(home) == before  # refused before anything was recorded
    proc = loom(home, "caption", str(tmp_path / "missing.png"), ok=False)
    assert proc.returncode == 1 and "no such file" in proc.stderr
    ok = loom(home, "caption", str(EXAMPLES / "scene_00.png"), "--out", str(tmp_path / "ok.jsonl"))
    assert ok.returncode == 0
    job = job_ids(home)["caption"][0]
    assert job in ok.stdout  # the summary names the job by its full id
    assert json.loads(loom(home, "status", job[:8], "--json").stdout)["id"] == job
    short = loom(home, "status", job[:5], ok=False)
    assert short.returncode == 1 and "at least 8" in short.stderr
