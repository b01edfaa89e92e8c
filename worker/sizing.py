"""Sizing a worker to its host: how many model processes, and how many torch threads each.

Torch-free (the ``loom worker`` parent and the API import it): it reads the cores this process may
use (CPU affinity, then the cgroup v2/v1 CPU quota) and the visible GPUs, and plans

- on CUDA: one model process per visible GPU (the process with slot k takes GPU k);
- on CPU: ``processes x threads`` that fill the usable cores and no more. A small model runs best
  as several single-thread processes (no OpenMP barrier per op), a large one wants fewer, wider
  processes for memory; the default caps the processes at ``MAX_CPU_PROCESSES`` and widens the
  threads beyond that.

``LOOM_WORKER_PROCESSES`` / Celery's ``-c`` and ``LOOM_TORCH_THREADS`` override the plan.

A model process also keeps its freed tensor buffers for the next batch instead of returning them
to the kernel (``tune_allocator``, glibc's mallopt; glibc's own MALLOC_* variables override it).

Several ``loom worker`` invocations on one host must not oversubscribe it (OpenMP threads that
spin-wait on shared cores collapse throughput 10x). Each model process therefore holds a
host-local slot: an ``flock``-ed file under the runtime directory. A process sizes its torch pool
to ``cores // max(processes planned, slots alive on the host)`` at start, and re-checks the live
slots between chunks (``HostShare.rebalance``), so a second invocation makes the first narrower.
The lock dies with its process, so a killed worker frees its slot without any cleanup.

Narrower threads are not enough when the processes outnumber the cores: two invocations of two
single-thread processes on two cores ran at 0.82 of one invocation (bench/eta.py --modes
local,local2), each model halved and the caches shared. So on a CPU host a process also takes a
run token (``HostShare.running``: ``cores // threads`` tokens, flock-ed files too) for each chunk
it runs; a process without one waits, holding its message, while the others run (their lingering
and filling claims take the waiting message's items too).
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

MAX_CPU_PROCESSES = 8  # beyond this, each process gets more threads rather than more copies
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


# --- what the host offers --------------------------------------------------------------------


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the cgroup's CPU quota (v2 ``cpu.max``, v1 ``cfs_quota/period``)."""
    try:
        parts = (root / "cpu.max").read_text().split()
        if parts and parts[0] != "max":
            return int(parts[0]) / int(parts[1])
        return None
    except (OSError, ValueError, IndexError):
        pass
    for v1 in (root / "cpu", root / "cpu,cpuacct", root):
        try:
            quota = int((v1 / "cpu.cfs_quota_us").read_text())
            period = int((v1 / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        if quota > 0 and period > 0:
            return quota / period
        return None
    return None


def usable_cores(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process may really use: affinity, capped by the cgroup quota (rounded up:
    a quota of 2.5 CPUs keeps three threads busy enough)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_root)
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def visible_gpus() -> int:
    """NVIDIA GPUs this process would see, without importing torch."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        ids = [d for d in cvd.split(",") if d.strip() and d.strip() != "-1"]
        return len(ids)
    try:
        found = len(os.listdir("/proc/driver/nvidia/gpus"))
        if found:
            return found
    except OSError:
        pass
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
            return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
        except (OSError, subprocess.SubprocessError):
            return 0
    return 0


# --- the plan --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    device: str  # "cuda" or "cpu"
    processes: int
    threads: int  # torch intra-op threads per process
    cores: int
    gpus: int
    reason: str

    def describe(self) -> str:
        return (f"{self.processes} model process(es) x {self.threads} torch thread(s) on "
                f"{self.device} ({self.cores} usable cores, {self.gpus} GPU(s)): {self.reason}")


def plan(
    *,
    device: str = "auto",
    processes: int | None = None,
    threads: int | None = None,
    cores: int | None = None,
    gpus: int | None = None,
) -> Plan:
    """Processes and threads for one worker invocation on this host. ``processes``/``threads``
    are the user's overrides (LOOM_WORKER_PROCESSES or -c, LOOM_TORCH_THREADS)."""
    cores = usable_cores() if cores is None else max(1, cores)
    gpus = (visible_gpus() if device != "cpu" else 0) if gpus is None else gpus
    on_cuda = device == "cuda" or (device == "auto" and gpus > 0)
    if on_cuda:
        procs = processes or max(1, gpus)
        # The GPU does the work; a few CPU threads per process decode and feed it.
        thr = threads or max(1, min(4, cores // procs))
        why = "one process per visible GPU" if not processes else "processes set by the user"
        return Plan("cuda", procs, thr, cores, gpus, why)
    if processes and threads:
        return Plan("cpu", processes, threads, cores, gpus, "processes and threads set by the user")
    if processes:
        return Plan("cpu", processes, max(1, cores // processes), cores, gpus,
                    "processes set by the user; threads fill the cores")
    if threads:
        return Plan("cpu", max(1, cores // threads), threads, cores, gpus,
                    "threads set by the user; processes fill the cores")
    procs = min(cores, MAX_CPU_PROCESSES)
    return Plan("cpu", procs, max(1, cores // procs), cores, gpus,
                "processes x threads = usable cores")


# --- applying it inside a model process ------------------------------------------------------


def decodes_on_model_thread(device: str, *, processes: int, threads: int, cores: int) -> bool:
    """Whether each model thread decodes its batch's inputs itself, just before the batch runs,
    instead of an I/O thread decoding them beside it: on a CPU host whose cores the model
    processes fill. There, a decode beside the model only takes the model's own core from it,
    at a price: interleaved with the model's work it made that work 5-10% slower (caption,
    ``bench/eta.py``: 622-634 -> 666-678 items/s). With a core to spare, or on a GPU the model
    thread mostly waits on, decoding beside the model overlaps."""
    return device == "cpu" and processes * threads >= cores


def thread_env(threads: int) -> dict[str, str]:
    """Environment for a child that will import torch: its OpenMP/MKL pools start this wide."""
    return {k: str(threads) for k in THREAD_ENV}


def apply_threads(threads: int, *, interop: bool = True) -> int:
    """Size this process's torch pools (call before the model loads); returns the value set."""
    import torch

    threads = max(1, int(threads))
    for k, v in thread_env(threads).items():
        os.environ[k] = v  # for anything this process spawns
    torch.set_num_threads(threads)
    if interop:
        try:
            torch.set_num_interop_threads(max(1, min(threads, 4)))
        except RuntimeError:  # already set, or inter-op work already ran: keep the old value
            pass
    return threads


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# Buffers up to this size come from the heap and are reused, not mmap'ed and unmapped per call
# (32 MiB is glibc's own ceiling for its adaptive threshold).
MMAP_THRESHOLD_BYTES = 32 << 20
# Free memory at the top of the heap that stays in the process instead of going back to the
# kernel: a model's per-batch buffers come back every batch.
TRIM_THRESHOLD_BYTES = 512 << 20
_GLIBC_MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def tune_allocator() -> bool:
    """Keep a model process's freed tensor buffers for the next batch (glibc only; call before
    the model runs). Returns whether it changed anything.

    With glibc's defaults, a batch's activations are handed back to the kernel when freed
    (munmap, or a trimmed heap) and the next batch faults them in again, zero-filled: page
    faults were 14% of an engine process's CPU on a generate job; tuned, the bare model loop
    ran 5-13% faster on caption and 17-26% on generate, and Loom's workers 5-14%. Left alone
    when the user set glibc's own MALLOC_* variables or a ``glibc.malloc`` tunable: theirs
    win."""
    if any(k in os.environ for k in _GLIBC_MALLOC_ENV) or \
            "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has it as a no-op; macOS has none)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and \
        bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


def runtime_dir() -> Path:
    """Host-local directory for the slot files (per user: other users' workers are theirs)."""
    base = os.environ.get("LOOM_RUNTIME_DIR") or os.environ.get("XDG_RUNTIME_DIR")
    path = Path(base) / "loom" if base else Path(tempfile.gettempdir()) / f"loom-{os.getuid()}"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path / "slots"


class HostShare:
    """This process's slot among the model processes on the host, and its fair thread count."""

    def __init__(self, *, cores: int, planned: int, fixed_threads: int | None = None,
                 directory: Path | None = None, recheck_seconds: float = 5.0,
                 run_tokens: int | None = None) -> None:
        """``run_tokens``: model processes that may run a chunk at once on this host (None: no
        limit, as on CUDA, where each process has its GPU)."""
        self.cores = max(1, cores)
        self.run_tokens = run_tokens
        self.planned = max(1, planned)
        self.fixed_threads = fixed_threads
        self.directory = directory or runtime_dir()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.recheck_seconds = recheck_seconds
        self.slot: int | None = None
        self._file: IO[Any] | None = None
        self._checked = 0.0
        self.threads = 0
        self.allocator_tuned = False
        self.pid = os.getpid()

    def acquire(self) -> int:
        """Take the lowest free slot (an exclusive flock held for the life of the process)."""
        k = 0
        while True:
            f = open(self.directory / f"slot-{k}", "a+")  # noqa: SIM115 - held until release
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                k += 1
                continue
            self._file, self.slot = f, k
            return k

    def alive(self) -> int:
        """Model processes holding a slot on this host now (this one included)."""
        n = 0
        for path in self.directory.glob("slot-*"):
            if self._file is not None and path.name == f"slot-{self.slot}":
                n += 1
                continue
            try:
                with open(path, "a+") as f:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(f, fcntl.LOCK_UN)
            except OSError:
                n += 1  # held by a live process
        return n

    def fair_threads(self) -> int:
        if self.fixed_threads:
            return self.fixed_threads
        return max(1, self.cores // max(self.planned, self.alive()))

    def start(self) -> int:
        """Acquire a slot and size torch to the share; returns the threads."""
        self.pid = os.getpid()
        self.acquire()
        self.threads = apply_threads(self.fair_threads())
        self.allocator_tuned = tune_allocator()
        self._checked = time.monotonic()
        return self.threads

    def rebalance(self) -> int:
        """Between chunks: follow the host's live slots (another invocation started or left)."""
        if self.fixed_threads or time.monotonic() - self._checked < self.recheck_seconds:
            return self.threads
        self._checked = time.monotonic()
        want = self.fair_threads()
        if want != self.threads:
            import torch

            torch.set_num_threads(want)
            log.info("host share changed: torch threads %d -> %d", self.threads, want)
            self.threads = want
        return self.threads

    @contextmanager
    def running(self, poll_seconds: float = 0.2) -> Iterator[None]:
        """Hold one of the host's run tokens for the block (waiting for one when all are held).

        A waiting process looks every ``poll_seconds``: slowly on purpose. A process that has just
        run a chunk takes its token back within milliseconds for its next one, so the token stays
        with a warm process; polling every 20 ms handed tokens over between chunks, to a process
        whose pipeline then starts cold (two invocations 0.93 of one, against 0.95-1.03 at 0.2 s:
        bench/eta.py --modes local,local2)."""
        if not self.run_tokens:
            yield
            return
        token = self._take_run_token(poll_seconds)
        try:
            yield
        finally:
            token.close()  # closing drops the flock

    def _take_run_token(self, poll_seconds: float) -> IO[Any]:
        first = self.slot or 0  # start at this process's own place: fewer collisions
        tokens = self.run_tokens  # at least 1: ``running`` takes none otherwise
        while True:
            for k in range(tokens):
                path = self.directory / f"run-{(first + k) % tokens}"
                f = open(path, "a+")  # noqa: SIM115 - held until the block ends
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return f
                except OSError:
                    f.close()
            time.sleep(poll_seconds)

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None
