"""What Loom adds per item to each model backend, over the bare loop of the same model, in one run.

For each backend (loom-shapes; ``hf:`` chat VLM (LLaVA) captioning; ``hf:`` CLIP embedding;
``diffusers:`` Stable Diffusion generating) on the same scenes: the bare loop (the model loaded
once, then ``caption``/``embed``/``generate`` on batches of ``--batch`` decoded images, the load
not timed) and an embedded ``loom`` job with that model (its items' first claim to last result,
read from its database afterwards). Printed: both rates, their ratio, and Loom's overhead per item
in milliseconds. The hub is not reachable here, so the hf/diffusers models are the tiny random-
weight ones the tests build from configs (tests/pipeline): their own cost per item is tiny, which
makes Loom's share as large as it will ever be. Both sides run one process with the host's
threads.

    python bench/backend_overhead.py --n 200
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "pipeline"))

from eta_modes import item_times  # noqa: E402
from harness import MAX_PIXELS, env_for, loom_cmd, render_inputs  # noqa: E402

SD_STEPS = 2
# Both sides run one model process with the host's threads: the embedded command would
# otherwise plan several engine processes here, and the ratio would compare plans, not Loom.
THREADS = max(1, len(os.sched_getaffinity(0)))


@dataclass
class Row:
    backend: str
    task: str
    items: int
    bare_s: float
    loom_s: float

    def line(self) -> str:
        bare, loom = self.items / self.bare_s, self.items / self.loom_s
        extra = (self.loom_s - self.bare_s) / self.items * 1000
        return (f"{self.backend:<28}{self.task:<10}{self.items:>6}{bare:>10.1f}{loom:>10.1f}"
                f"{loom / bare:>8.2f}{extra:>12.2f}")


HEADER = (f"{'backend':<28}{'task':<10}{'items':>6}{'bare/s':>10}{'loom/s':>10}{'ratio':>8}"
          f"{'ms/item +':>12}")


def build_models(work: Path) -> dict[str, str]:
    """The tiny models the tests build, saved under ``work``: backend ref by kind."""
    from test_diffusers import build_sd
    from test_hf_chat import build_llava
    from test_hf_embed import build_clip

    refs = {}
    for kind, build, prefix in (("chat", build_llava, "hf:"), ("clip", build_clip, "hf:"),
                                ("sd", build_sd, "diffusers:")):
        path = work / "models" / kind
        if not path.exists():
            build(path)
        refs[kind] = prefix + str(path)
    return refs


def bare_seconds(ref: str, task: str, paths: list[Path], prompts: list[str], batch: int,
                 device: str) -> float:
    """The model's own loop: decoded once per batch from the files, as Loom's engine reads them."""
    import torch
    import transformers

    from loom import media
    from pipeline import registry

    transformers.logging.set_verbosity_error()  # the tiny tokenizers truncate every prompt
    torch.set_num_threads(THREADS)
    model = registry.load(ref, device=device)
    params: dict[str, Any] = {"num_inference_steps": SD_STEPS} if ref.startswith("diffusers:") \
        else {}

    def run(lo: int, hi: int) -> None:
        if task == "generate":
            model.generate(prompts[lo:hi], list(range(lo, hi)), **params)
            return
        images = [media.decode_image(p.read_bytes(), max_pixels=MAX_PIXELS) for p in paths[lo:hi]]
        call: Callable[..., Any] = getattr(model, "embed" if task == "embed" else "caption")
        call(images)

    run(0, min(batch, len(paths)))  # warm-up
    t0 = time.perf_counter()
    for lo in range(0, len(paths), batch):
        run(lo, min(lo + batch, len(paths)))
    return time.perf_counter() - t0


def loom_seconds(ref: str, task: str, work: Path, batch: int, device: str, n: int) -> float:
    home = work / f"home-{task}-{ref.split(':')[0]}-{time.monotonic_ns()}"
    args = {"caption": ["caption", str(work / "images"), "--out", str(home / "c.jsonl")],
            "embed": ["embed", str(work / "images"), "--out", str(home / "e.parquet")],
            "generate": ["generate", "--prompts", str(work / "prompts.txt"), "--out",
                         str(home / "gen"), "--seed", "0"]}[task]
    if ref != "loom-shapes":
        args += ["--model", ref]
    if ref.startswith("diffusers:"):
        args += ["--param", f"num_inference_steps={SD_STEPS}"]
    started = time.time()
    proc = subprocess.run([*loom_cmd(), *args, "--no-cache"], capture_output=True, text=True,
                          env=env_for(home=home, device=device, batch_size=batch,
                                      embedded_processes=1, torch_threads=THREADS), cwd=work)
    if proc.returncode != 0:
        raise RuntimeError(f"loom {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}")
    first, last = item_times(home / "loom.db", started)
    if first is None or last is None:
        raise RuntimeError(f"no item times for {ref} {task}")
    # first claim to last result: the batches the model ran, as in the bare loop (whose warm-up
    # and load are not timed either), plus what Loom does around each
    return last - first


def measure(work: Path, n: int, batch: int, device: str, *, tiny: bool = True) -> list[Row]:
    paths, prompts = render_inputs(work, n)
    plan = [("loom-shapes", "caption"), ("loom-shapes", "embed"), ("loom-shapes", "generate")]
    if tiny:
        refs = build_models(work)
        plan += [(refs["chat"], "caption"), (refs["clip"], "embed"), (refs["sd"], "generate")]
    rows = []
    for ref, task in plan:
        bare = bare_seconds(ref, task, paths, prompts, batch, device)
        loom = loom_seconds(ref, task, work, batch, device, n)
        name = ref if ref == "loom-shapes" else f"{ref.split(':')[0]}:tiny-{Path(ref).name}"
        rows.append(Row(name, task, n, bare, loom))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", type=Path, default=None)
    a = ap.parse_args(argv)
    work = a.work or Path(tempfile.mkdtemp(prefix="loom-backends-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = measure(work, a.n, a.batch, a.device)
    print(f"{a.n} scenes, batch {a.batch}, device {a.device}; bare: model loaded, batches timed; "
          "loom: embedded job, first claim to last result")
    print(HEADER)
    for r in rows:
        print(r.line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
