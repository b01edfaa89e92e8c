"""Embedded runs on the whole machine: several engine processes on one recorded job.

The engine processes are forks of a multiprocessing *forkserver* that imported torch once
(importing it in every process took about 1.6 s of CPU each, on the cores the caller needs to
record the job); the server is a clean interpreter that never ran a torch op nor touched CUDA, so
a fork of it is as safe as a spawned process. Its imports are the longest part of start-up, so
the ``loom`` entry point starts it first (``start_server``), and ``EngineProcesses`` asks it for
the processes on a thread (each request waits until the server is ready): the caller records the
job and stores its inputs meanwhile. Where there is no forkserver, they are spawned. Each process
sizes torch to its share of the host (``worker.sizing``: processes x threads = usable cores, one
process per GPU on CUDA), then waits for the job id and runs ``Engine.run_job`` on it. SQLite in
WAL mode with BEGIN IMMEDIATE claims keeps the processes from taking the same item; completion is
fenced as in distributed mode, so the exactly-once guarantee is the same.

Ctrl-C: the children ignore SIGINT; the caller sets the stop event, each engine finishes the batch
in flight, gives back the leases of what it claimed but did not run, and exits. Any lease a child
still holds after that (it was killed) is released by the caller, so ``loom run JOB`` resumes at
once.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue as queue_mod
import signal
import socket
import threading
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover (light to import: the `loom` entry point uses start_server)
    from loom.config import Settings

log = logging.getLogger(__name__)

Progress = Callable[[int], None]


def plan_for(settings: Settings) -> Any:
    from worker import sizing

    return sizing.plan(device=settings.device, processes=settings.embedded_processes,
                       threads=settings.torch_threads)


# What the forkserver imports once, before its first fork: what every engine process needs, and
# worker.engine_server, which lets the server exit without the interpreter's teardown.
_PRELOAD = ["torch", "pipeline.registry", "worker.engine", "loom.db", "loom.storage",
            "worker.engine_server"]


def _context() -> Any:
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def start_server() -> None:
    """Start the forkserver the engine processes will be forked from, without waiting for it.

    Its imports (torch and the engine: about 5 s of one core here) are the longest part of an
    embedded command's start-up; started first, they run beside everything the command does
    before it needs the engines (reading the inputs, opening the database, recording the job).
    A command that fails before that leaves nothing behind: the server exits with its parent."""
    if _context().get_start_method() != "forkserver":
        return
    from multiprocessing import forkserver

    # The server inherits SIGINT ignored through exec: a Ctrl-C during its imports would
    # otherwise kill it with a traceback; the caller stops the engines cleanly instead.
    main_thread = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGINT, signal.SIG_IGN) if main_thread else None
    try:
        forkserver.ensure_running()
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, old)


def _child(settings: Settings, model: str, threads: int, gpu: int | None, worker_id: str,
           jobs_q: Any, events_q: Any, stop: Any, decode_on_model_thread: bool) -> None:
    """One engine process: size torch, load the model, then run the jobs it is sent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop (stop event)
    try:
        from worker import sizing

        sizing.apply_threads(threads)
        sizing.tune_allocator()
        if gpu is not None:
            import torch

            torch.cuda.set_device(gpu)
        from loom.db import make_engine, make_session_factory
        from loom.storage import store_from_settings
        from worker.engine import Engine

        db = make_engine(settings.database_url)
        engine = Engine(settings, session_factory=make_session_factory(db),
                        store=store_from_settings(settings), worker_id=worker_id,
                        should_stop=stop.is_set, decode_on_model_thread=decode_on_model_thread)
        try:
            from loom import tasks

            try:
                # Load while the caller records the job. A tenant's fine-tuned model is loaded
                # by the first batch instead (its name means something only for that tenant).
                if model in tasks.BUILTIN_MODELS or tasks.backend_of(model):
                    engine.model(model)
            except Exception:  # the items fail with the reason; the process carries on
                log.exception("could not preload %s", model)
            events_q.put(("ready", worker_id, None))
            while (job_id := jobs_q.get()) is not None:
                engine.run_job(job_id, progress=lambda n: events_q.put(("n", worker_id, n)))
                events_q.put(("done", worker_id, None))
        finally:
            engine.close()
            db.dispose()
    except BaseException:
        events_q.put(("error", worker_id, traceback.format_exc()))
    # Everything is committed: skip the interpreter's teardown (torch's takes seconds), but let
    # the queue's feeder thread deliver what was put first.
    events_q.close()
    events_q.join_thread()
    os._exit(0)


class EngineProcesses:
    """``processes`` engine processes, started now and fed job ids later (``run``)."""

    def __init__(self, settings: Settings, *, processes: int | None = None,
                 items: int | None = None, model: str | None = None) -> None:
        plan = plan_for(settings)
        self.settings = settings
        self.plan = plan
        self.model = model or settings.default_model
        if processes is None and items is not None and not settings.embedded_processes:
            # A small job does not pay for more model loads than it has batches.
            needed = max(1, -(-items // settings.batch_size))
            processes = min(plan.processes, needed) if needed < plan.processes else None
        self.processes = processes or plan.processes
        threads = plan.threads if processes is None else max(1, plan.cores // self.processes)
        if settings.torch_threads:
            threads = settings.torch_threads
        self.threads = threads
        from worker import sizing

        self.decode_on_model_thread = sizing.decodes_on_model_thread(
            plan.device, processes=self.processes, threads=threads, cores=plan.cores)
        ctx = _context()
        self._events: Any = ctx.Queue()
        self._stop = ctx.Event()
        self._children: list[tuple[str, Any, Any]] = []  # (worker_id, process, jobs queue)
        host = socket.gethostname()
        self._worker_ids = [f"cli-{host}-{os.getpid()}-{k}" for k in range(self.processes)]
        self._starter: threading.Thread | None = None
        self._start_error: BaseException | None = None
        if ctx.get_start_method() == "forkserver":
            # Each start waits until the server has imported torch (seconds): start them on a
            # thread, so that the caller records the job meanwhile (``run`` waits for them).
            self._starter = threading.Thread(target=self._start, args=(ctx, plan, threads),
                                             name="loom-engine-start", daemon=True)
            self._starter.start()
            return
        # Spawned children start with SIGINT ignored (inherited through exec), so a Ctrl-C while
        # they import torch does not kill them with a traceback; the parent stops them instead.
        main_thread = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGINT, signal.SIG_IGN) if main_thread else None
        try:
            self._start(ctx, plan, threads)
        finally:
            if main_thread:
                signal.signal(signal.SIGINT, old)

    def _start(self, ctx: Any, plan: Any, threads: int) -> None:
        try:
            self._start_all(ctx, plan, threads)
        except BaseException as exc:
            self._start_error = exc
            if self._starter is None:
                raise

    def _started(self) -> None:
        """Wait until every process is started; re-raise what stopped a start."""
        if self._starter is not None:
            self._starter.join()
        if self._start_error is not None:
            raise RuntimeError(f"could not start the engine processes: {self._start_error}")

    def _start_all(self, ctx: Any, plan: Any, threads: int) -> None:
        settings = self.settings
        for k, worker_id in enumerate(self._worker_ids):
            jobs_q = ctx.SimpleQueue()
            gpu = k % plan.gpus if plan.device == "cuda" and plan.gpus else None
            proc = ctx.Process(target=_child, name=f"loom-engine-{k}", daemon=True,
                               args=(settings, self.model, threads, gpu, worker_id, jobs_q,
                                     self._events, self._stop, self.decode_on_model_thread))
            proc.start()
            self._children.append((worker_id, proc, jobs_q))

    def describe(self) -> str:
        return (f"{self.processes} engine process(es) x {self.threads} torch thread(s) on "
                f"{self.plan.device} ({self.plan.cores} usable cores)")

    @property
    def worker_ids(self) -> list[str]:
        return list(self._worker_ids)

    def run(self, job_id: str, progress: Progress | None = None) -> None:
        """Run ``job_id`` on every engine process until each sees the job final (or a stop).
        KeyboardInterrupt: stop cleanly (see the module docstring), then re-raise."""
        try:
            self._started()
        except KeyboardInterrupt:
            self.stop()
            raise
        for _, _, jobs_q in self._children:
            jobs_q.put(job_id)
        running = {w for w, _, _ in self._children}
        errors: list[str] = []
        try:
            while running:
                try:
                    kind, worker_id, value = self._events.get(timeout=0.5)
                except queue_mod.Empty:
                    for w, proc, _ in self._children:
                        if w in running and not proc.is_alive():
                            running.discard(w)
                            errors.append(f"{w} exited with code {proc.exitcode}")
                    continue
                if kind == "n" and progress is not None:
                    progress(int(value))
                elif kind == "done":
                    running.discard(worker_id)
                elif kind == "error":
                    running.discard(worker_id)
                    errors.append(f"{worker_id}: {value}")
        except KeyboardInterrupt:
            self.stop()
            raise
        if errors and len(errors) == len(self._children):
            raise RuntimeError("every engine process failed:\n" + "\n".join(errors))
        for e in errors:
            log.error("engine process failed (the others finished the job): %s", e)

    def stop(self, timeout: float = 30.0) -> int:
        """Stop every engine after its batch in flight; returns leases released by the caller
        as a backstop (0 when the children gave theirs back themselves)."""
        self._stop.set()
        self.close(timeout=timeout)
        from loom import jobs
        from loom.db import make_engine, make_session_factory

        db = make_engine(self.settings.database_url)
        try:
            with make_session_factory(db)() as session:
                return sum(jobs.release_leases(session, worker_id=w) for w in self.worker_ids)
        finally:
            db.dispose()

    def close(self, timeout: float = 30.0) -> None:
        if self._starter is not None:
            self._starter.join()
        for _, proc, jobs_q in self._children:
            if proc.is_alive():
                try:
                    jobs_q.put(None)
                except (OSError, ValueError):
                    pass
        for _, proc, _ in self._children:
            proc.join(timeout=timeout)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        self._events.close()
        self._events.join_thread()

    def __enter__(self) -> EngineProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._starter is not None:
            self._starter.join()
        if any(p.is_alive() for _, p, _ in self._children):
            self.close()
