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

    return argv[1] in _RUNS_HERE or argv[1] in {s.command for s in tasks.inference()}


def main() -> None:
    if not runs_engines(sys.argv):
        from worker.cli import app

        app()
        return
    from worker.embedded import start_server

    start_server()
    from worker.cli import app

    try:
        app()  # Typer ends with SystemExit(code) when it returns normally
    except SystemExit as exc:
        code = exc.code
    else:
        code = 0
    _exit_now(code)


def _exit_now(code: int | str | None) -> None:
    """End an embedded command without the interpreter's teardown: freeing every module of a
    process that imported SQLAlchemy, pydantic and rich took 0.3-0.5 s after the results were
    written. Nothing is left to tear down by then: the command closed its database and its
    engine processes (and the forkserver exits with us), and stdout and stderr are flushed
    here. An uncaught exception does not come here: it ends the process as usual."""
    import logging
    import os

    if isinstance(code, str):  # SystemExit("message"): printed, exit status 1
        print(code, file=sys.stderr)
        code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing more can be written
            pass
    os._exit(code or 0)
