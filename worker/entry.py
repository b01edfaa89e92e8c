"""The ``loom`` command: the CLI (worker.cli), with the embedded engines' forkserver started first.

A command that runs a model on this machine (``loom caption``, ``ask``, ``generate``, ``run``)
needs engine processes whose imports (torch and the engine) take about 5 s of one core; the CLI's
own imports take about a second more before the command's code runs. Starting the server here,
before those, takes that second off the command's start-up (worker.embedded.start_server).
"""

from __future__ import annotations

import sys

# Besides the task commands (loom.tasks): the command that resumes a recorded job here.
_RUNS_HERE = frozenset({"run"})


def runs_engines(argv: list[str]) -> bool:
    """Whether ``loom ARGV`` will run a model in this process's engines."""
    if len(argv) < 2 or any(a in ("--help", "-h") for a in argv[1:]):
        return False
    from loom import tasks

    return argv[1] in _RUNS_HERE or argv[1] in {s.command for s in tasks.REGISTRY.values()}


def main() -> None:
    if runs_engines(sys.argv):
        from worker.embedded import start_server

        start_server()
    from worker.cli import app

    app()
