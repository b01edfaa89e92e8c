"""Bring your own model, embedded: tiny random-weight models built from configs (a LLaVA chat VLM,
CLIP, a Stable Diffusion pipeline), saved with save_pretrained and run by the real `loom` CLI,
the real engine processes and the real loading code. A prompt template filled from a dataset's
columns, generation params, a row without the template's column failing alone, lineage of the
filled prompt, the seed giving the same bytes, and loom-shapes refusing a free prompt."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from test_cli import loom, rows

# The builders of the pipeline tests: the same tiny models, built the same way.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipeline"))
pytest.importorskip("transformers")
pytest.importorskip("diffusers")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "images"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("loom-backends")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from test_diffusers import build_sd
    from test_hf_chat import build_llava
    from test_hf_embed import build_clip

    root = tmp_path_factory.mktemp("tiny-models")
    return {"llava": build_llava(root / "llava"), "clip": build_clip(root / "clip"),
            "sd": build_sd(root / "sd")}


def _table(home: Path) -> Path:
    """Four example scenes; the third row has no category."""
    table = home / "scenes.csv"
    lines = ["file,category"] + [f"{EXAMPLES}/scene_0{i}.png,{c}"
                                 for i, c in enumerate(["circle", "triangle", "", "square"])]
    table.write_text("\n".join(lines) + "\n")
    return table


def test_a_chat_vlm_captions_with_a_templated_prompt(home: Path, models: dict[str, Path]) -> None:
    table = _table(home)
    out = home / "captions.jsonl"
    proc = loom(home, "caption", str(table), "--image-col", "file",
                "--model", f"hf:{models['llava']}", "--prompt", "Describe the {category}",
                "--param", "max_new_tokens=5", "--out", str(out), ok=False)
    assert proc.returncode == 3, proc.stderr  # the row without a category failed, alone
    got = rows(out)
    assert [r["status"] for r in got] == ["succeeded", "succeeded", "failed", "succeeded"]
    assert got[2]["error_code"] == "invalid_input" and "{category}" in got[2]["error_message"]
    assert all(r["caption"] and len(r["caption"].split()) <= 5 for r in got if r["caption"])
    # Lineage: the model folder, its weights' sha256, and the instruction each row became.
    job = next(line.split()[0] for line in loom(home, "jobs").stdout.splitlines())
    full = [json.loads(line) for line in loom(home, "results", job).stdout.splitlines()]
    assert full[0]["lineage"]["model"] == f"hf:{models['llava'].resolve()}"
    assert len(full[0]["lineage"]["weights_sha256"]) == 64
    assert full[0]["lineage"]["details"]["prompt"] == "Describe the circle"
    assert full[3]["lineage"]["details"]["prompt"] == "Describe the square"


def test_a_chat_vlm_answers_questions(home: Path, models: dict[str, Path]) -> None:
    proc = loom(home, "ask", str(EXAMPLES / "scene_00.png"), "what color is the circle?",
                "--model", f"hf:{models['llava']}", "--param", "max_new_tokens=3")
    answer = proc.stdout.strip().splitlines()[-1]  # after the run's summary line
    assert 1 <= len(answer.split()) <= 3


def test_sampling_with_a_seed_repeats(home: Path, models: dict[str, Path]) -> None:
    args = ["caption", str(EXAMPLES / "scene_00.png"), str(EXAMPLES / "scene_01.png"),
            "--model", f"hf:{models['llava']}", "--param", "temperature=1.0", "--param",
            "seed=11", "--param", "max_new_tokens=6", "--no-cache"]
    loom(home, *args, "--out", str(home / "s1.jsonl"))
    loom(home, *args, "--out", str(home / "s2.jsonl"))
    assert [r["caption"] for r in rows(home / "s1.jsonl")] == [
        r["caption"] for r in rows(home / "s2.jsonl")]


def test_n_outputs_per_item_are_one_row_with_its_choices(
    home: Path, models: dict[str, Path]
) -> None:
    images = [str(EXAMPLES / "scene_00.png"), str(EXAMPLES / "scene_01.png")]
    args = ["caption", *images, "--model", f"hf:{models['llava']}", "--param", "n=3",
            "--param", "temperature=1.0", "--param", "seed=9", "--param", "max_new_tokens=4",
            "--no-cache"]
    loom(home, *args, "--out", str(home / "n.jsonl"))
    got = rows(home / "n.jsonl")
    assert len(got) == 2  # one row per input, never one per choice
    for r in got:
        assert len(r["choices"]) == 3 and r["caption"] == r["choices"][0]
        assert all(1 <= len(c.split()) <= 4 for c in r["choices"])
    # Seeded sampling: the same seed gives the same choices; they are not all one text.
    loom(home, *args, "--out", str(home / "n2.parquet"))
    import pyarrow.parquet as pq

    table = pq.read_table(home / "n2.parquet").to_pylist()
    assert [t["choices"] for t in table] == [r["choices"] for r in got]
    assert any(len(set(r["choices"])) > 1 for r in got)
    # A job without n has no choices column in its table.
    loom(home, "caption", images[0], "--model", f"hf:{models['llava']}", "--param",
         "max_new_tokens=2", "--out", str(home / "one.jsonl"))
    assert "choices" not in rows(home / "one.jsonl")[0]


def test_what_a_model_cannot_take_is_refused_before_any_job(
    home: Path, models: dict[str, Path]
) -> None:
    proc = loom(home, "caption", str(EXAMPLES / "scene_00.png"), "--prompt", "Describe it",
                ok=False)
    assert proc.returncode == 1 and "does not take a free prompt" in proc.stderr
    proc = loom(home, "caption", str(EXAMPLES / "scene_00.png"), "--model",
                f"hf:{models['clip']}", ok=False)
    assert proc.returncode == 1 and "does not serve task 'caption'" in proc.stderr
    proc = loom(home, "caption", str(EXAMPLES / "scene_00.png"), "--param", "nucleus=3",
                ok=False)
    assert proc.returncode == 1 and "nucleus" in proc.stderr
    proc = loom(home, "caption", str(EXAMPLES / "scene_00.png"), "--param", "n=2", ok=False)
    assert proc.returncode == 1 and "params.n: model 'loom-shapes' does not take 'n'" in proc.stderr


def test_clip_embeds_and_searches(home: Path, models: dict[str, Path]) -> None:
    out = home / "vectors.parquet"
    loom(home, "embed", str(EXAMPLES), "--model", f"hf:{models['clip']}", "--out", str(out))
    import pyarrow.parquet as pq

    vecs = pq.read_table(out).column("vector").to_pylist()
    assert len(vecs) == 24 and len({len(v) for v in vecs}) == 1
    job = next(line.split()[0] for line in loom(home, "jobs").stdout.splitlines())
    hits = [json.loads(line) for line in loom(
        home, "search", "a red circle", "--in", job, "-k", "3", "--json").stdout.splitlines()]
    assert [h["rank"] for h in hits] == [1, 2, 3]


def test_diffusers_generates_the_same_bytes_for_the_same_seed(
    home: Path, models: dict[str, Path]
) -> None:
    args = ["generate", "a red circle", "--model", f"diffusers:{models['sd']}", "--seed", "5",
            "--variants", "2", "--param", "num_inference_steps=2", "--param", "width=64",
            "--param", "height=64", "--no-cache"]
    loom(home, *args, "--out", str(home / "g1"))
    loom(home, *args, "--out", str(home / "g2"))
    first = [(home / "g1" / r["file"]).read_bytes() for r in rows(home / "g1" / "index.jsonl")]
    again = [(home / "g2" / r["file"]).read_bytes() for r in rows(home / "g2" / "index.jsonl")]
    assert first == again and all(b.startswith(b"\x89PNG") for b in first)
    assert len({hashlib.sha256(b).hexdigest() for b in first}) == 2  # seeds 5 and 6 differ
    from PIL import Image

    with Image.open(home / "g1" / "00000.png") as image:
        assert image.size == (64, 64)


def test_a_named_model_is_resolved_when_a_job_is_recorded(
    home: Path, models: dict[str, Path]
) -> None:
    loom(home, "models", "add", "tiny-chat", "--backend", "hf", "--ref", str(models["llava"]),
         "--param", "max_new_tokens=3")
    listed = loom(home, "models").stdout
    assert f"tiny-chat -> hf:{models['llava'].resolve()}" in listed
    assert "tasks: caption, vqa" in listed and "max_new_tokens" in listed
    out = home / "named.jsonl"
    loom(home, "caption", str(EXAMPLES / "scene_00.png"), "--model", "tiny-chat", "--no-cache",
         "--out", str(out))
    assert 1 <= len(rows(out)[0]["caption"].split()) <= 3  # the name's default param
    job = next(line.split()[0] for line in loom(home, "jobs").stdout.splitlines())
    [row] = [json.loads(line) for line in loom(home, "results", job).stdout.splitlines()]
    assert row["lineage"]["model"] == f"hf:{models['llava'].resolve()}"  # the reference ran
    loom(home, "models", "remove", "tiny-chat")
    proc = loom(home, "caption", str(EXAMPLES / "scene_00.png"), "--model", "tiny-chat",
                ok=False)
    assert proc.returncode == 1 and "unknown model" in proc.stderr
    proc = loom(home, "models", "add", "x", "--backend", "ftp", "--ref", "y", ok=False)
    assert proc.returncode == 1 and "backend" in proc.stderr
