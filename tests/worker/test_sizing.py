"""Worker sizing: usable cores (affinity + cgroup quota), the process x thread plan, and the
host-local slots that keep several worker invocations from oversubscribing one host."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from worker import sizing

ROOT = Path(__file__).resolve().parents[2]


def test_cgroup_v2_quota_caps_the_affinity(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert sizing._cgroup_quota(tmp_path) == 1.5
    assert sizing.usable_cores(tmp_path) == min(len(os.sched_getaffinity(0)), 2)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert sizing._cgroup_quota(tmp_path) is None
    assert sizing.usable_cores(tmp_path) == len(os.sched_getaffinity(0))


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert sizing._cgroup_quota(tmp_path) == 1.0
    assert sizing.usable_cores(tmp_path) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert sizing._cgroup_quota(tmp_path) is None


def test_cpu_plan_fills_the_cores_and_no_more() -> None:
    for cores in (1, 2, 3, 8, 16, 64):
        p = sizing.plan(device="cpu", cores=cores, gpus=0)
        assert p.device == "cpu"
        assert p.processes * p.threads <= cores
        assert p.processes * p.threads > cores - p.processes  # fills them (up to rounding)
    assert sizing.plan(device="cpu", cores=2, gpus=0).processes == 2
    assert sizing.plan(device="cpu", cores=64, gpus=0).processes == sizing.MAX_CPU_PROCESSES


def test_overrides_win() -> None:
    assert (sizing.plan(device="cpu", cores=8, gpus=0, processes=2).threads) == 4
    p = sizing.plan(device="cpu", cores=8, gpus=0, threads=8)
    assert (p.processes, p.threads) == (1, 8)
    p = sizing.plan(device="cpu", cores=8, gpus=0, processes=3, threads=1)
    assert (p.processes, p.threads) == (3, 1)


def test_the_model_thread_decodes_only_on_a_cpu_host_it_fills() -> None:
    for cores in (1, 2, 8, 64):
        p = sizing.plan(device="cpu", cores=cores, gpus=0)
        assert sizing.decodes_on_model_thread(p.device, processes=p.processes,
                                              threads=p.threads, cores=p.cores)
    # A core left over (the user asked for fewer threads): the I/O pool decodes on it.
    assert not sizing.decodes_on_model_thread("cpu", processes=1, threads=1, cores=2)
    assert sizing.decodes_on_model_thread("cpu", processes=3, threads=1, cores=2)
    # On a GPU the model thread mostly waits on the device: decoding beside it overlaps.
    p = sizing.plan(device="auto", cores=32, gpus=4)
    assert not sizing.decodes_on_model_thread(p.device, processes=p.processes,
                                              threads=p.threads, cores=p.cores)


def test_cuda_plan_is_one_process_per_gpu() -> None:
    p = sizing.plan(device="auto", cores=32, gpus=4)
    assert (p.device, p.processes) == ("cuda", 4)
    assert sizing.plan(device="cpu", cores=32, gpus=4).device == "cpu"


def test_visible_gpus_follows_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,3")
    assert sizing.visible_gpus() == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert sizing.visible_gpus() == 0


HOLDER = """
import sys, time
from pathlib import Path
from worker import sizing
share = sizing.HostShare(cores=int(sys.argv[2]), planned=1, directory=Path(sys.argv[1]))
share.acquire()
print(share.slot, flush=True)
time.sleep(120)
"""


def test_slots_split_the_host_between_invocations(tmp_path: Path) -> None:
    """A second invocation on the host halves the first one's threads (at its next rebalance)
    and a dead process frees its slot without cleanup."""
    slots = tmp_path / "slots"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    mine = sizing.HostShare(cores=8, planned=1, directory=slots, recheck_seconds=0)
    mine.acquire()
    assert mine.slot == 0 and mine.alive() == 1 and mine.fair_threads() == 8
    other = subprocess.Popen([sys.executable, "-c", HOLDER, str(slots), "8"], env=env,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout is not None
        assert other.stdout.readline().strip() == "1"  # slot 0 is held: it took the next one
        assert mine.alive() == 2
        assert mine.fair_threads() == 4
        mine.threads = 8
        assert mine.rebalance() == 4
    finally:
        other.kill()
        other.wait()
        if other.stdout is not None:
            other.stdout.close()
    deadline = time.monotonic() + 10
    while mine.alive() != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert mine.alive() == 1 and mine.fair_threads() == 8
    mine.release()
    again = sizing.HostShare(cores=8, planned=1, directory=slots)
    assert again.acquire() == 0  # the released slot is reused
    again.release()


def test_planned_processes_bound_the_share_before_siblings_start(tmp_path: Path) -> None:
    share = sizing.HostShare(cores=8, planned=4, directory=tmp_path / "s")
    share.acquire()
    assert share.fair_threads() == 2  # 4 planned, only 1 started yet
    share.release()
    fixed = sizing.HostShare(cores=8, planned=4, fixed_threads=3, directory=tmp_path / "s")
    assert fixed.fair_threads() == 3


def _loom_worker(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
    full.update({"PYTHONPATH": str(ROOT), "LOOM_DEVICE": "cpu", **env})
    loom = Path(sys.executable).parent / "loom"
    return subprocess.run([str(loom), "worker", *args, "--help"], env=full, capture_output=True,
                          text=True, timeout=120)


def test_loom_worker_prints_its_plan_and_honours_the_overrides() -> None:
    """`loom worker` logs the plan, then hands over to celery (here: its --help)."""
    plain = _loom_worker()
    assert plain.returncode == 0, plain.stderr
    p = sizing.plan(device="cpu")
    assert f"loom worker: {p.processes} model process(es) x {p.threads} torch thread(s)" \
        in plain.stderr
    assert "concurrency" in plain.stdout.lower()  # celery's own help: the exec happened
    env = _loom_worker(LOOM_WORKER_PROCESSES="3", LOOM_TORCH_THREADS="1")
    assert "3 model process(es) x 1 torch thread(s)" in env.stderr
    flag = _loom_worker("-c", "1")
    assert f"1 model process(es) x {p.cores} torch thread(s)" in flag.stderr


_MMAPPED_AFTER_4MB = """
import ctypes, sys
from worker import sizing

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
tuned = sizing.tune_allocator() if sys.argv[1] == "tune" else False
before = libc.mallinfo2().hblks
block = libc.malloc(4 << 20)
print(tuned, libc.mallinfo2().hblks - before)
"""


def _mmapped_after_4mb(mode: str, **env: str) -> tuple[str, int]:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", _MMAPPED_AFTER_4MB, mode], cwd=ROOT,
                         env={**base, **env}, capture_output=True, text=True, check=True)
    tuned, mapped = out.stdout.split()
    return tuned, int(mapped)


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION")
                    is None, reason="glibc's mallopt")
def test_tuned_allocator_keeps_batch_sized_buffers_in_the_heap() -> None:
    # glibc's default: a 4 MiB buffer is its own mapping, unmapped (and faulted in again) per
    # batch. Tuned: it comes from the heap and is reused.
    assert _mmapped_after_4mb("default") == ("False", 1)
    assert _mmapped_after_4mb("tune") == ("True", 0)
    # The user's own glibc settings win.
    assert _mmapped_after_4mb("tune", MALLOC_TRIM_THRESHOLD_="131072")[0] == "False"
    assert _mmapped_after_4mb("tune", GLIBC_TUNABLES="glibc.malloc.mmap_threshold=65536") == (
        "False", 1)


def test_run_tokens_let_only_so_many_processes_run_at_once(tmp_path: Path) -> None:
    """Two model processes, one token: the second runs its chunk only once the first is done
    (flock on separate opens conflicts as between processes; a killed process frees its token)."""
    import threading

    slots = tmp_path / "slots"
    first = sizing.HostShare(cores=1, planned=1, directory=slots, run_tokens=1)
    second = sizing.HostShare(cores=1, planned=1, directory=slots, run_tokens=1)
    order: list[str] = []
    entered = threading.Event()

    def run_second() -> None:
        entered.set()
        with second.running(poll_seconds=0.005):
            order.append("second runs")

    with first.running():
        order.append("first runs")
        waiter = threading.Thread(target=run_second)
        waiter.start()
        entered.wait(5)
        order.append("first done")
    waiter.join(10)
    assert order == ["first runs", "first done", "second runs"]


def test_without_run_tokens_nothing_waits(tmp_path: Path) -> None:
    share = sizing.HostShare(cores=1, planned=1, directory=tmp_path / "s")
    with share.running(), share.running():
        pass
