"""Fine-tuning on the extension world (shared/specs/shapes-world.md), end to end, as a user would.

    .venv/bin/python bench/finetune_quality.py [--rows 2000] [--eval 1000] [--steps 1500]

1. Renders --rows labelled extension scenes (pink, cyan, diamond added; own renderer with the
   usual perturbations) into a folder of PNGs and a JSONL table {file, caption, question, answer}.
2. Runs `loom finetune TABLE --name shapes-ext` (the real CLI, embedded, in a subprocess) and
   times it from start to exit: reading the table, training, scoring the held-out rows,
   storing and registering the weights.
3. Loads the registered version and measures exact match on fresh scenes drawn by the OTHER
   renderer (pipeline.render_alt, perturbed): caption and VQA on the extension world, and on the
   original world (no forgetting), --eval scenes each; the shipped base model beside it.

Targets (issue 10): at most 15 minutes on this 2-core CPU; extension caption and VQA >= 98%;
original world >= 99%. Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--eval", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=2026)
    a = ap.parse_args(argv)

    import torch

    from pipeline import data, finetune, registry
    from pipeline.evaluate import understanding

    work = Path(tempfile.mkdtemp(prefix="loom-finetune-"))
    try:
        t0 = time.perf_counter()
        table = work / "labelled.jsonl"
        with table.open("w") as f:
            for i, r in enumerate(finetune.labelled_rows(a.rows, seed=a.seed)):
                name = f"{i:05d}.png"
                r.image.save(work / name)
                f.write(json.dumps({"file": name, "caption": r.caption, "question": r.question,
                                    "answer": r.answer}) + "\n")
        print(f"{a.rows} labelled extension scenes in {time.perf_counter() - t0:.1f}s")

        env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
        env["LOOM_HOME"] = str(work / "home")
        loom = Path(sys.executable).parent / "loom"
        cmd = [str(loom), "finetune", str(table), "--name", "shapes-ext", "--question-col",
               "question", "--steps", str(a.steps)]
        t0 = time.perf_counter()
        run = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        print(run.stderr[-1500:] + run.stdout[-1500:])
        if run.returncode != 0:
            print(f"loom finetune exited {run.returncode}")
            return 1
        weights = next((work / "home").rglob("*.safetensors"))
        from pipeline.checkpoint import sha256_file

        torch.set_num_threads(2)
        tuned = registry.load_file(weights, name="shapes-ext", version="v1",
                                   sha256=sha256_file(weights), device="cpu")
        base = registry.load("loom-shapes", device="cpu")
        figures = {}
        for label, model in (("fine-tuned", tuned), ("base", base)):
            with torch.inference_mode():
                ext = understanding(model, a.eval, 777, "other-perturbed", world=data.EXTENDED)
                orig = understanding(model, a.eval, 778, "other-perturbed")
            figures[label] = (ext, orig)
        print(f"\nloom finetune wall clock: {wall:.0f} s ({wall / 60:.1f} min; target <= 15 min)")
        print(f"{'model':<12}{'ext caption':>12}{'ext vqa':>10}{'orig caption':>14}"
              f"{'orig vqa':>10}   (other renderer, perturbed, {a.eval} scenes each)")
        for label, (ext, orig) in figures.items():
            print(f"{label:<12}{ext['caption']:>12.1%}{ext['vqa']:>10.1%}"
                  f"{orig['caption']:>14.1%}{orig['vqa']:>10.1%}")
        print("targets: extension caption and vqa >= 98%, original >= 99%")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
