"""The torch-free part of the ``loom`` CLI (Typer + rich), registered explicitly.

``build_app()`` makes the app with the commands that need no model: job queries and control
(``loom.cli.jobs``: embedded on the local SQLite, or remote with ``--api``), remote submission
(``loom.cli.submit``, one command per task in the registry), services (``loom.cli.services``)
and ``dedupe`` (``loom.cli.vectors``), ``loom verify`` (``loom.cli.verify``) and ``loom usage``
(``loom.cli.usage``).
The console script (``worker/cli.py``) adds the embedded commands that run the model.
"""

from __future__ import annotations

import typer

from loom.cli import jobs, services, submit, tenants, usage, vectors, verify


def build_app() -> typer.Typer:
    app = typer.Typer(
        name="loom",
        help="Loom: bulk captioning, visual question answering, text-to-image and embedding jobs.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )
    for module in (jobs, submit, services, tenants, vectors, verify, usage):
        module.register(app)
    return app


__all__ = ["build_app"]
