"""One prepared script for a GPU machine: is Loom close to the bare GPU loop there?

Prints, in one run on the device given (``cuda`` when there is one, else the CPU, where CI runs it
as a smoke test with a handful of scenes):

1. the device: torch, its name, memory, bf16 support;
2. loom-shapes' own loop per precision (fp32, and fp16/bf16 under autocast where the device has
   them) and batch size: items/s for caption and generate, and how many captions agree with fp32
   (whether the model allows that precision);
3. bench/eta.py's modes on that device: the bare loop (the host plan), the embedded command and
   one ``loom worker`` on PostgreSQL + Redis + a local store, each as a ratio (eta) of the bare
   loop, with the model's busy share (infer's share of the engine processes' wall time);
4. bench/backend_overhead.py's rows: each backend (the shapes model and the tiny hf/diffusers
   models) bare and as an embedded job.

    python bench/gpu_check.py                   # on the GPU machine: 2000 scenes
    python bench/gpu_check.py --n 16 --batches 4 --modes bare,embedded   # the CPU smoke test
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import backend_overhead  # noqa: E402
from eta import print_report  # noqa: E402
from eta_modes import STAGES, Result, bare, distributed, embedded  # noqa: E402
from harness import MAX_PIXELS, Services, render_inputs  # noqa: E402


def describe_device(device: str) -> list[str]:
    import torch

    lines = [f"torch {torch.__version__}, device {device}"]
    if device.startswith("cuda"):
        p = torch.cuda.get_device_properties(0)
        lines.append(f"  {p.name}, {p.total_memory / 2**30:.0f} GiB, capability "
                     f"{p.major}.{p.minor}, bf16 {torch.cuda.is_bf16_supported()}")
    else:
        lines.append(f"  {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads")
    return lines


def precisions(device: str) -> list[str]:
    import torch

    if device.startswith("cuda"):
        return ["fp32", "fp16"] + (["bf16"] if torch.cuda.is_bf16_supported() else [])
    return ["fp32", "bf16"]  # CPU autocast has bf16 only


def precision_sweep(paths: list[Path], prompts: list[str], device: str,
                    batches: list[int]) -> list[str]:
    """loom-shapes' own loop (decoded images in memory, load not timed) per precision and batch."""
    import contextlib

    import torch

    from loom import media
    from pipeline import registry

    model = registry.load("loom-shapes", device=device)
    images = [media.decode_image(p.read_bytes(), max_pixels=MAX_PIXELS) for p in paths]
    kind = "cuda" if device.startswith("cuda") else "cpu"
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}

    def sync() -> None:
        if kind == "cuda":
            torch.cuda.synchronize()

    reference: list[str] = []
    lines = [f"{'precision':<10}{'batch':>6}{'caption/s':>12}{'generate/s':>12}"
             f"{'captions = fp32':>17}"]
    for name in precisions(device):
        for batch in batches:
            ctx = (contextlib.nullcontext() if name == "fp32"
                   else torch.autocast(device_type=kind, dtype=dtypes[name]))
            with ctx:
                model.caption(images[:batch])  # warm-up (kernels, autotuning)
                model.generate(prompts[:batch], list(range(min(batch, len(prompts)))))
                sync()
                t0 = time.perf_counter()
                captions: list[str] = []
                for i in range(0, len(images), batch):
                    captions += model.caption(images[i:i + batch])
                sync()
                t_cap = time.perf_counter() - t0
                t0 = time.perf_counter()
                for i in range(0, len(prompts), batch):
                    model.generate(prompts[i:i + batch], list(range(i, i + len(prompts[i:i + batch]))))
                sync()
                t_gen = time.perf_counter() - t0
            if name == "fp32" and not reference:
                reference = captions
            agree = sum(a == b for a, b in zip(captions, reference)) / max(len(captions), 1)
            lines.append(f"{name:<10}{batch:>6}{len(images) / t_cap:>12.1f}"
                         f"{len(prompts) / t_gen:>12.1f}{agree:>17.1%}")
    return lines


def busy_share(r: Result) -> str:
    if not r.stages_ms or "infer" not in r.stages_ms:
        return ""
    return f"model busy {r.stages_ms['infer'] / 1000 / (r.seconds * r.processes):.0%}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--batches", default="32,128,512", help="batch sizes for the sweep")
    ap.add_argument("--batch", type=int, default=None,
                    help="Loom's batch for the modes (default: the sweep's largest)")
    ap.add_argument("--modes", default="bare,embedded,local")
    ap.add_argument("--backends", action=argparse.BooleanOptionalAction, default=True,
                    help="also the per-backend rows (tiny hf/diffusers models)")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--pg", default=os.environ.get("LOOM_BENCH_PG",
                                                    "postgresql://127.0.0.1:5432/postgres"))
    ap.add_argument("--redis", default=os.environ.get("LOOM_BENCH_REDIS",
                                                       "redis://127.0.0.1:6379/13"))
    a = ap.parse_args(argv)
    import torch

    from worker import sizing

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    batches = [int(b) for b in a.batches.split(",")]
    batch = a.batch or max(batches)
    modes = [m for m in a.modes.split(",") if m]
    work = a.work or Path(tempfile.mkdtemp(prefix="loom-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    paths, prompts = render_inputs(work, a.n)
    print("\n".join(describe_device(device)))
    print(f"{a.n} scenes in {work}")

    print("\n== 1. loom-shapes' own loop per precision and batch (load not timed)")
    print("\n".join(precision_sweep(paths, prompts, device, batches)))

    print(f"\n== 2. Loom against the bare loop on {device}, batch {batch}")
    plan = sizing.plan(device=device)
    print(f"host plan: {plan.describe()}")
    results: list[Result] = []
    limits: dict[str, float] = {}
    svc = Services(a.pg, a.redis) if "local" in modes else None
    try:
        for task in ("caption", "generate"):
            inputs: list[Any] = ([str(p) for p in paths] if task == "caption"
                                 else list(enumerate(prompts)))
            if "bare" in modes:
                r = bare(task, inputs, plan.processes, plan.threads, batch, device, work)
                limits[task] = r.rate
                results.append(r)
            if "embedded" in modes:
                results.append(embedded(task, a.n, work, batch, device))
            if svc is not None:
                results.append(distributed(task, paths, prompts, svc, work, batch, device,
                                           s3=False))
    finally:
        if svc is not None:
            svc.close()
    print_report(results, limits)
    for r in results:
        if busy_share(r):
            print(f"{r.task} {r.mode}: {busy_share(r)} "
                  f"(stages: {', '.join(s for s in STAGES if s in r.stages_ms)})")

    if a.backends:
        print(f"\n== 3. each backend bare and as an embedded job on {device}, batch "
              f"{min(batches)}")
        rows = backend_overhead.measure(work / "backends", min(a.n, 512), min(batches), device)
        print(backend_overhead.HEADER)
        for row in rows:
            print(row.line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
