"""Host commands: ``loom worker`` (the Celery worker for this host, sized to it by
worker.sizing, then exec'd) and ``loom train`` (pipeline.train). Both hand the process over to
another program's arguments; heavy imports happen inside them."""

import os
import sys

import typer

from loom.cli.common import err


def register(app: typer.Typer) -> None:
    @app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
                 add_help_option=False)
    def worker(ctx: typer.Context) -> None:
        """Run the Celery worker for this host (queue "loom"): one invocation per host starts
        the model processes that fill it (one per GPU; on CPU processes x torch threads = usable
        cores). LOOM_WORKER_PROCESSES / -c and LOOM_TORCH_THREADS override; extra args go to
        celery."""
        from loom.config import Settings
        from worker import sizing

        args = list(ctx.args)
        given: int | None = None
        for i, a in enumerate(args):  # -c N, -cN, --concurrency N, --concurrency=N
            value = None
            if a in ("-c", "--concurrency") and i + 1 < len(args):
                value = args[i + 1]
            elif a.startswith("--concurrency="):
                value = a.split("=", 1)[1]
            elif a.startswith("-c") and a[2:].isdigit():
                value = a[2:]
            if value is not None and value.isdigit() and int(value) > 0:
                given = int(value)
        settings = Settings()
        plan = sizing.plan(device=settings.device, processes=given or settings.worker_processes,
                           threads=settings.torch_threads)
        env = dict(os.environ)
        # The children read these: the planned share (threads = cores / processes on the host)...
        env["LOOM_WORKER_PROCESSES"] = str(plan.processes)
        # ...and start their OpenMP pools that wide (torch is imported after the fork).
        for k, v in sizing.thread_env(plan.threads).items():
            env.setdefault(k, v)
        err.print(f"loom worker: {plan.describe()}")
        argv = [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-Q", "loom"]
        if given is None:
            argv += ["-c", str(plan.processes)]
        os.execve(sys.executable, argv + args, env)


    @app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
                 add_help_option=False)
    def train(ctx: typer.Context) -> None:
        """Train the shapes model (pipeline.train); arguments are passed through (--help for
        them)."""
        from pipeline.train import main

        raise typer.Exit(main(list(ctx.args)) or 0)
