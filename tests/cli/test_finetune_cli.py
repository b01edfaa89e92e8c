"""``loom finetune`` through the real console script: a labelled table (Parquet, image bytes) in,
a registered version out; ``--model NAME`` on the next commands; bad tables refused up front."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from test_cli import home, loom, rows  # noqa: F401  (home is a fixture)


def test_finetune_registers_a_version_that_caption_and_ask_use(home: Path) -> None:  # noqa: F811
    from pipeline import finetune

    labelled = finetune.labelled_rows(12, seed=11)
    blobs = []
    for r in labelled:
        buf = io.BytesIO()
        r.image.save(buf, format="PNG")
        blobs.append(buf.getvalue())
    table = home / "labelled.parquet"
    pq.write_table(pa.table({"img": blobs, "text": [r.caption for r in labelled],
                             "q": [r.question for r in labelled],
                             "a": [r.answer for r in labelled]}), table)
    proc = loom(home, "finetune", str(table), "--name", "shapes-ext", "--image-col", "img",
                "--caption-col", "text", "--question-col", "q", "--answer-col", "a",
                "--steps", "2", "--batch", "4")
    out = proc.stdout + proc.stderr
    assert "12 labelled rows" in out and "registered shapes-ext@v1" in out, out
    assert "new words:" in out and "pink" in out
    assert "step 2/2" in out  # the training events, printed as they arrive

    models = loom(home, "models").stdout
    assert "shapes-ext@v1  fine-tuned from loom-shapes@v1 on 12 rows" in models

    img = home / "one.png"
    img.write_bytes(blobs[0])
    caps = home / "caps.jsonl"
    loom(home, "caption", str(img), "--model", "shapes-ext", "--out", str(caps))
    assert isinstance(rows(caps)[0]["caption"], str)
    answer = loom(home, "ask", str(img), "is there a pink diamond?", "--model", "shapes-ext")
    assert answer.stdout.strip().splitlines()[-1] in ("yes", "no")
    assert "Traceback" not in answer.stderr
    # The base does not know the word; the fine-tuned version does not draw.
    base = loom(home, "ask", str(img), "is there a pink diamond?", ok=False)
    assert base.returncode == 4 and "'pink', 'diamond'" in base.stderr
    gen = loom(home, "generate", "a red circle", "--model", "shapes-ext", ok=False)
    assert gen.returncode == 1 and "does not serve task 'generate'" in gen.stderr


def test_a_table_without_labels_is_refused_before_anything_runs(home: Path) -> None:  # noqa: F811
    table = home / "unlabelled.jsonl"
    (home / "x.png").write_bytes(b"\x89PNG not really")
    table.write_text(json.dumps({"file": "x.png", "note": "no caption"}) + "\n")
    proc = loom(home, "finetune", str(table), "--name", "nope", ok=False)
    assert proc.returncode == 1 and "row 1 has no caption" in proc.stderr
    bad = loom(home, "finetune", str(table), "--name", "Not A Name", ok=False)
    assert bad.returncode == 1 and "not a model name" in bad.stderr
    base = loom(home, "finetune", str(table), "--name", "ok", "--base", "nobody", ok=False)
    assert base.returncode == 1 and "unknown model 'nobody'" in base.stderr
