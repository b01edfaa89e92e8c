"""How close Loom gets to the bare model loop: one command, one run, the same inputs for every mode.

Renders N shapes-world scenes (half PNG, half JPEG) and, for caption and generate, measures:

  bare        the model loop alone (read file, decode, model call, batch B; generate also encodes
              and writes the PNG), as 1 process x all threads and as P processes x 1 thread, with
              the allocator tuned as Loom's model processes tune it; the best is the LIMIT the
              other modes are judged against (model load not timed); and the best one again
              as a program would run it, its start-up included (interpreter, torch import, model
              load), which the embedded command also pays
  embedded    `loom caption DIR --out F` / `loom generate --prompts F --out DIR`, the real CLI in
              a subprocess, wall clock from start to exit (start-up and writing results included)
  local       distributed: `loom worker` (the README's one command per host) on PostgreSQL + Redis
              with a local file store; from submit to the job's final status
  local2      the same with two `loom worker` commands on this host, against one (they share its
              cores through worker.sizing's slots; the second must not cost the first)
  s3          the same with an S3 endpoint (a moto_server this script starts)
  store       that endpoint's own get/put rate at the worker's I/O concurrency; the s3 mode is
              judged against min(limit, store rate), and also shown against 1 / (1/limit +
              1/store), the bound when the endpoint shares this host's cores (moto here)
  ray         Ray Data with the same model (map_batches over an actor pool), when ray is installed
              (pip install 'loom[bench]')

For the Loom modes it prints a timeline, read from the run's database afterwards (the first claim,
the steady rate up to the last result, the tail, and the ceiling they put on the ratio), and a
stage breakdown (claim, fetch, decode, infer, encode, upload,
complete): each stage's summed seconds over all engine processes, and that as a share of the
processes' wall time (the stages overlap, so infer's share is how busy the model was).

    python bench/eta.py                          # 5000 scenes, every mode (minutes)
    python bench/eta.py --n 500 --modes bare,embedded --tasks caption   # a quick look
    python bench/eta.py --n 6000 --modes bare,local --tasks caption --bare plan --rounds 3

``--rounds R`` (with bare and local) measures the bare loop and local R times, alternating, and a
last bare after them: each local run is judged against the mean of the bare runs on either side
of it, so a drift of this host's speed during the run (seen here: the bare rate moving by 10%
between runs minutes apart) does not land on one side of the ratio only.

Distributed modes need PostgreSQL (--pg, an admin URL; a fresh database is created and dropped)
and Redis (--redis, a DB number of its own; nothing is flushed). Numbers are ratios measured side
by side in one run on this machine, not targets checked by tests. The modes themselves are in
eta_modes.py; this file chooses them and prints the report.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from eta_modes import (  # imports harness, which puts the project on sys.path
    IO_THREADS,
    STAGES,
    Result,
    bare,
    bare_as_program,
    distributed,
    embedded,
    ray_data,
    store_rate,
)
from harness import Services, render_inputs

ALL_MODES = ("bare", "embedded", "local", "local2", "s3", "store", "ray")


# --- report ------------------------------------------------------------------------------------


def print_report(results: list[Result], limits: dict[str, float]) -> None:
    print()
    print(f"{'task':<9}{'mode':<22}{'items':>7}{'seconds':>9}{'items/s':>10}{'ratio':>8}  note")
    print("-" * 90)
    for r in results:
        ref = r.against or limits.get(r.task)
        ratio = f"{r.rate / ref:.2f}" if ref else "-"
        print(f"{r.task:<9}{r.mode:<22}{r.items:>7}{r.seconds:>9.2f}{r.rate:>10.1f}{ratio:>8}  "
              f"{r.note}")
    for r in results:
        limit = r.against or limits.get(r.task)
        if r.first_claim is None or r.last_result is None or not limit:
            continue
        steady = r.items / max(r.last_result - r.first_claim, 1e-9)
        tail = r.seconds - r.last_result
        # Even at the limit's own rate from the first claim on, start-up and tail cap the ratio.
        ceiling = (r.items / limit) / (r.first_claim + r.items / limit + max(tail, 0.0))
        print(f"timeline {r.task} {r.mode}: first claim at {r.first_claim:.2f}s, then "
              f"{steady:.1f} items/s ({steady / limit:.2f} of the limit) to the last result at "
              f"{r.last_result:.2f}s, done {tail:.2f}s later; with this start-up and tail the "
              f"ratio cannot exceed {ceiling:.2f}")
    for r in results:
        if not r.stages_ms:
            continue
        wall = r.seconds * r.processes
        secs = {s: r.stages_ms[s] / 1000 for s in STAGES if s in r.stages_ms}
        parts = [f"{s} {v:.1f}s ({v / wall:.0%})" for s, v in secs.items()]
        print(f"stages {r.task} {r.mode} ({r.processes} proc): " + ", ".join(parts))


def bracketed(task: str, inputs: list[Any], paths: list[Path], prompts: list[str], plan: Any,
              a: argparse.Namespace, work: Path, svc: Services, *,
              first: tuple[float, float]) -> None:
    """``a.rounds`` local runs, each between two bare runs of the host plan; prints each local
    run's ratio to the mean of the bare runs around it, and their median."""
    bares, locals_ = [first[0]], [first[1]]
    for _ in range(a.rounds - 1):
        bares.append(bare(task, inputs, plan.processes, plan.threads, a.batch, a.device,
                          work).rate)
        locals_.append(distributed(task, paths, prompts, svc, work, a.batch, a.device,
                                   s3=False, invocations=1).rate)
    bares.append(bare(task, inputs, plan.processes, plan.threads, a.batch, a.device, work).rate)
    ratios = [rate / ((bares[k] + bares[k + 1]) / 2) for k, rate in enumerate(locals_)]
    print(f"bracketed {task} local / bare, {a.rounds} rounds: "
          + ", ".join(f"{r:.2f}" for r in ratios) + f"; median {statistics.median(ratios):.2f}"
          + " (bare " + ", ".join(f"{b:.0f}" for b in bares) + "; local "
          + ", ".join(f"{x:.0f}" for x in locals_) + " items/s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=5000, help="scenes (items per job)")
    ap.add_argument("--modes", default=",".join(ALL_MODES), help=",".join(ALL_MODES))
    ap.add_argument("--tasks", default="caption,generate")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bare", choices=("all", "plan"), default="all",
                    help="bare configurations: 1 x all threads, P x 1 and the host plan (all), "
                         "or only the host plan (plan, quicker)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="with bare and local: alternate them this many times (see above)")
    ap.add_argument("--work", type=Path, default=None, help="working directory (default: temp)")
    ap.add_argument("--pg", default=os.environ.get("LOOM_BENCH_PG",
                                                    "postgresql://127.0.0.1:5432/postgres"),
                    help="PostgreSQL admin URL (a database is created and dropped)")
    ap.add_argument("--redis", default=os.environ.get("LOOM_BENCH_REDIS",
                                                       "redis://127.0.0.1:6379/13"))
    a = ap.parse_args(argv)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    unknown = set(modes) - set(ALL_MODES)
    if unknown:
        ap.error(f"unknown modes: {', '.join(sorted(unknown))}")

    from worker import sizing

    plan = sizing.plan(device=a.device)
    work = a.work or Path(tempfile.mkdtemp(prefix="loom-eta-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    paths, prompts = render_inputs(work, a.n)
    print(f"{a.n} scenes in {work} ({time.perf_counter() - t0:.1f}s); host plan: {plan.describe()}")

    results: list[Result] = []
    limits: dict[str, float] = {}
    programs: dict[str, Result] = {}
    svc: Services | None = None
    try:
        for task in tasks:
            inputs: list[Any] = ([str(p) for p in paths] if task == "caption"
                                 else list(enumerate(prompts)))
            if "bare" in modes:
                configs = {(1, plan.cores), (plan.cores, 1), (plan.processes, plan.threads)}
                if plan.device == "cuda" or a.bare == "plan":
                    configs = {(plan.processes, plan.threads)}
                bares = [bare(task, inputs, p, t, a.batch, a.device, work)
                         for p, t in sorted(configs)]
                best = max(bares, key=lambda r: r.rate)
                limits[task] = best.rate
                results += bares
                programs[task] = bare_as_program(best)
                results.append(programs[task])
                print(f"{task} limit: {best.rate:.1f} items/s ({best.mode})", flush=True)
            if "embedded" in modes:
                results.append(embedded(task, a.n, work, a.batch, a.device))
                if task in programs:
                    results[-1].note += (f"; {results[-1].rate / programs[task].rate:.2f} of the "
                                         "bare loop as a program")
                print(f"{task} embedded: {results[-1].rate:.1f} items/s", flush=True)
            one: Result | None = None
            for mode in ("local", "local2", "s3"):
                if mode in modes:
                    svc = svc or Services(a.pg, a.redis)
                    r = distributed(task, paths, prompts, svc, work, a.batch, a.device,
                                    s3=mode == "s3", invocations=2 if mode == "local2" else 1)
                    if mode == "local":
                        one = r
                    elif mode == "local2" and one is not None:
                        r.note += f"; {r.rate / one.rate:.2f} of one invocation (local)"
                    results.append(r)
                    print(f"{task} {r.mode}: {r.rate:.1f} items/s", flush=True)
            if a.rounds > 1 and one is not None and task in limits:
                svc = svc or Services(a.pg, a.redis)
                bracketed(task, inputs, paths, prompts, plan, a, work, svc,
                          first=(limits[task], one.rate))
            if "store" in modes or "s3" in modes:
                svc = svc or Services(a.pg, a.redis)
                s = store_rate(task, paths, svc, plan.processes * IO_THREADS)
                results.append(s)
                for r in results:
                    if r.task == task and r.mode == "s3" and task in limits:
                        r.against = min(limits[task], s.rate)
                        # The endpoint runs on this host: its CPU per item and the model's add
                        # up, so together they cannot beat 1 / (1/limit + 1/store).
                        shared = 1.0 / (1.0 / limits[task] + 1.0 / s.rate)
                        r.note += (f"; vs min(limit, store) = {r.against:.0f}/s; "
                                   f"{r.rate / shared:.2f} of {shared:.0f}/s if the endpoint "
                                   "shares the cores")
            if "ray" in modes:
                try:
                    import ray  # noqa: F401
                except ImportError:
                    print("ray: skipped (not installed; pip install 'loom[bench]')")
                else:
                    best_p, best_t = (plan.processes, plan.threads)
                    results.append(ray_data(task, paths, prompts, best_p, best_t, a.batch,
                                            a.device))
    finally:
        if svc is not None:
            svc.close()
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print_report(results, limits)
    return 0


if __name__ == "__main__":
    sys.exit(main())
