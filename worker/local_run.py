"""Running a job embedded: the items (streamed) with their images linked or copied into the
local store, the job recorded, this machine's engine processes (worker.embedded) driven with a
progress bar, Ctrl-C turned into released leases and a printed way to resume, and the summary.
Used by the embedded commands in worker/cli.py."""

import itertools
import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import typer

from loom.cli.common import (
    Local,
    console,
    err,
    fail,
    local_failures,
    local_job,
    make_progress,
    print_failures,
)
from loom.cli.inputs import Source

def _ext_of(data: bytes) -> str:
    from loom.errors import InvalidInput
    from loom.media import image_format

    try:
        return image_format(data)
    except InvalidInput:
        return "bin"  # stored anyway: the worker fails this item with the reason


# (item {"input", "metadata"}, its image: a file, its bytes, an s3:// URI, or None)
Pair = tuple[dict[str, Any], Path | bytes | str | None]

# Items read ahead to size the engine processes (a job smaller than this many batches does not
# pay for more model loads than it has batches), and copied into the store per window.
_PEEK_BATCHES = 64
_COPY_WINDOW = 256


def sources_of(srcs: Iterable[Source]) -> Iterator[Pair]:
    for s in srcs:
        yield ({"input": dict(s.input), "metadata": s.metadata or None},
               s.data if s.data is not None else s.uri or s.path)


def _stored(local: Local, job_id: str, pairs: Iterable[Pair]) -> Iterator[dict[str, Any]]:
    """The items, each image copied into the store under its input key first (threads: I/O),
    one bounded window at a time, so a million-row table never sits in memory."""
    from concurrent.futures import ThreadPoolExecutor

    from loom import s3, storage
    from loom.errors import InputMissing, StorageError

    linkable = isinstance(local.store, storage.LocalStore)

    def one(i: int, pair: Pair) -> dict[str, Any]:
        spec, path = pair
        if path is None:
            return spec
        if linkable and isinstance(path, Path):
            try:  # the header names the format; the bytes are linked or copied by the kernel
                with path.open("rb") as f:
                    head = f.read(64)
                key = storage.input_key(local.tenant_id, job_id, i, _ext_of(head))
                local.store.put_file(key, path)
                spec["input"]["image_key"] = key
                return spec
            except OSError:
                pass  # read below, so that the item fails with the reason
        try:
            if isinstance(path, str):
                data = s3.read_uri(path, endpoint_url=local.settings.s3_endpoint_url)
            else:
                data = path if isinstance(path, bytes) else path.read_bytes()
        except (OSError, InputMissing) as exc:  # the item fails with the reason, not the job
            data = b""
            reason = exc.message if isinstance(exc, InputMissing) else str(exc.strerror)
            spec["metadata"] = {**(spec["metadata"] or {}), "read_error": reason}
        except StorageError as exc:
            raise fail(f"{exc.message} (the job was not recorded)") from None
        key = storage.input_key(local.tenant_id, job_id, i, _ext_of(data))
        local.store.put(key, data, "application/octet-stream")
        spec["input"]["image_key"] = key
        return spec

    if linkable:
        # Linking a file is a few syscalls: threads would only add GIL hand-offs, and the
        # engine processes loading the model beside us need the cores.
        yield from itertools.starmap(one, enumerate(pairs))
        return
    source, start = iter(pairs), 0
    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="loom-copy") as pool:
        while window := list(itertools.islice(source, _COPY_WINDOW)):
            yield from pool.map(one, range(start, start + len(window)), window)
            start += len(window)


def run_embedded(
    local: Local, task: str, pairs: Iterable[Pair], params: dict[str, Any] | None = None,
    model: str | None = None, use_cache: bool = True, metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Record a job (inputs stored under its keys), run it on this machine's engine processes
    with a progress bar, and print the summary. ``pairs``: (item {"input", "metadata"}, the
    image of the item: a file, its bytes, or None), read as a stream.

    The engine processes start first (worker.embedded), so their torch import and model load
    overlap with recording the job. Ctrl-C stops them cleanly and prints how to resume."""
    from loom import jobs
    from loom.models import new_id
    from worker.embedded import EngineProcesses

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    settings = local.settings
    started = time.monotonic()
    source = iter(pairs)
    head = list(itertools.islice(source, settings.batch_size * _PEEK_BATCHES))
    known = len(head) if len(head) < settings.batch_size * _PEEK_BATCHES else None
    with EngineProcesses(settings, items=known, model=model) as engines:
        job_id = new_id()
        with local.session_factory() as s:
            job = jobs.submit_job(
                s, job_id=job_id, tenant_id=local.tenant_id, task=task,
                model_name=model or settings.default_model,
                items=_stored(local, job_id, itertools.chain(head, source)),
                params=params or {}, use_cache=use_cache, metadata=metadata,
                chunk_size=settings.chunk_size, max_attempts=settings.max_attempts,
            )
            total = job.item_count
        drive(local, engines, job.id, task, total)
    elapsed = time.monotonic() - started
    summary = local_job(local, job.id)
    c = summary["counts"]
    console.print(
        f"job [bold]{job.id}[/bold]: {summary['status']} - {c.get('succeeded', 0)} succeeded, "
        f"{c.get('failed', 0)} failed" + (f", {c['cancelled']} cancelled" if c.get("cancelled")
                                          else "")
        + f" in {elapsed:.1f}s, {total / max(elapsed, 1e-9):.1f} items/s"
        + f" ({engines.describe()})"
    )
    print_failures(local_failures(local, job.id))
    return summary


# Exit codes a script can rely on (README, "The CLI, embedded"): 0 every item succeeded; 1 the
# command could not start (bad arguments, no such file, unknown model); these two after a run.
EXIT_SOME_FAILED = 3  # the job finished and some items failed (their rows carry the error)
EXIT_NOTHING_SUCCEEDED = 4  # no item succeeded


def drive(local: Local, engines: Any, job_id: str, task: str, total: int,
           completed: int = 0) -> None:
    """Run ``job_id`` on ``engines`` with a progress bar; Ctrl-C stops cleanly and says where
    the finished items are and how to resume."""
    try:
        with make_progress() as progress:
            bar = progress.add_task(f"{task} {job_id[:8]}", total=total, completed=completed)
            engines.run(job_id, progress=lambda n: progress.advance(bar, n))
    except KeyboardInterrupt:
        job = local_job(local, job_id)
        err.print(
            f"interrupted: {job['done']} of {job['item_count']} items of job {job_id} are done; "
            f"their leases are released.\n  finished items: loom results {job_id}\n"
            f"  resume:         loom run {job_id}"
        )
        raise typer.Exit(130) from None


