"""``loom/jobs`` is the only code that runs SQL on job tables (ARCHITECTURE.md, issue 24).

Every module of loom/, worker/ and api/ outside loom/jobs is parsed with ``ast`` and searched for
a statement on a job-table model: ``select(Job...)``, ``update(Item)``, ``insert(Event)``,
``delete(Outbox)``, ``session.get(Output, ...)``, ``session.query(Delivery)``, a new row
(``session.add(Job(...))``) or raw SQL naming a job table in ``text(...)``. Naming a model in a
type hint is fine: the rows such a module holds come from loom.jobs functions.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("loom", "worker", "api")
OWNER = "loom/jobs/"

# The models whose tables belong to jobs. Tenants, API keys and files have their own owners
# (loom/tenants.py, loom/files.py); a test below makes every new model pick a side.
JOB_MODELS = frozenset({"Job", "Item", "Output", "Event", "Outbox", "Delivery", "ModelVersion",
                        "RegisteredModel", "ModelAlias", "Batch", "TenantClaim", "Lease"})
OTHER_MODELS = frozenset({"Tenant", "ApiKey", "File"})
JOB_TABLES = ("jobs", "items", "outputs", "events", "outbox", "deliveries", "model_versions",
              "registered_models", "model_aliases", "batches", "tenant_claims", "leases")

ALLOWED: set[str] = set()  # no exceptions: a new owner of job-table SQL is a design change

# Callables that run or build a statement when a job-table model is among their arguments:
# SQLAlchemy's statement constructors, the Session's ORM methods, and the joins of a select.
STATEMENT_CALLS = frozenset({
    "select", "update", "insert", "delete",
    "get", "query", "add", "add_all", "merge", "execute", "scalar", "scalars",
    "select_from", "join", "outerjoin",
})
_RAW_SQL = re.compile(
    r"\b(from|update|into|join|table)\s+\"?(" + "|".join(JOB_TABLES) + r")\b", re.IGNORECASE)


def _dotted(node: ast.expr) -> str | None:
    """``a.b.c`` for a Name or a chain of Attributes, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _model_names(tree: ast.AST) -> tuple[dict[str, str], set[str]]:
    """(local name -> job model, names bound to the loom.models module), from the module's
    imports wherever they are (in functions too: a lazy import runs the same SQL)."""
    models: dict[str, str] = {}
    modules = {"loom.models"}  # ``import loom.models`` then ``loom.models.Job``
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "loom.models":
            for alias in node.names:
                if alias.name in JOB_MODELS:
                    models[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module == "loom":
            for alias in node.names:
                if alias.name == "models":
                    modules.add(alias.asname or "models")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "loom.models" and alias.asname:
                    modules.add(alias.asname)
    return models, modules


def _model_ref(node: ast.AST, models: dict[str, str], modules: set[str]) -> str | None:
    """The job model ``node`` itself names (``Job``, ``models.Job``), or None."""
    if isinstance(node, ast.Name):
        return models.get(node.id)
    if isinstance(node, ast.Attribute) and node.attr in JOB_MODELS:
        return node.attr if _dotted(node.value) in modules else None
    return None


def _job_model_in(nodes: list[ast.expr], models: dict[str, str], modules: set[str]) -> str | None:
    """The first job model that any of ``nodes`` (searched all the way down) refers to."""
    for top in nodes:
        for node in ast.walk(top):
            model = _model_ref(node, models, modules)
            if model is not None:
                return model
    return None


def job_table_statements(source: str) -> list[str]:
    """``line: what`` for each statement on a job table in ``source``."""
    tree = ast.parse(source)
    models, modules = _model_names(tree)
    found: list[str] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        callee = node.func.id if isinstance(node.func, ast.Name) else (
            node.func.attr if isinstance(node.func, ast.Attribute) else None)
        args = [*node.args, *(k.value for k in node.keywords)]
        if callee in STATEMENT_CALLS:
            model = _job_model_in(args, models, modules)
            if model is not None:
                found.append(f"{node.lineno}: {callee}(...) on {model}")
        elif (model := _model_ref(node.func, models, modules)) is not None:
            found.append(f"{node.lineno}: new {model} row")  # Job(...): built to be inserted
        elif callee == "text" and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and _RAW_SQL.search(node.args[0].value):
            found.append(f"{node.lineno}: raw SQL on a job table")
    return sorted(found, key=lambda f: int(f.partition(":")[0]))


def _scanned_files() -> list[Path]:
    return sorted(p for pkg in SCANNED for p in (ROOT / pkg).rglob("*.py"))


def test_only_loom_jobs_runs_statements_on_job_tables() -> None:
    offenders: dict[str, list[str]] = {}
    for path in _scanned_files():
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(OWNER) or rel in ALLOWED:
            continue
        found = job_table_statements(path.read_text())
        if found:
            offenders[rel] = found
    assert offenders == {}, (
        "SQL on job tables outside loom/jobs (move it into a kw-only function there and call "
        f"that): {offenders}")


def test_the_allow_list_names_real_modules() -> None:
    # A stale entry would let a new module of that name in unnoticed.
    assert all((ROOT / rel).is_file() for rel in ALLOWED)


def test_every_model_is_a_job_table_or_not() -> None:
    # A new table must pick a side, so the check above cannot miss it by omission.
    from loom.models import Base

    mapped = {m.class_.__name__: m.class_.__tablename__ for m in Base.registry.mappers}
    assert set(mapped) == JOB_MODELS | OTHER_MODELS
    assert sorted(mapped[m] for m in JOB_MODELS) == sorted(JOB_TABLES)


def test_the_check_finds_statements_and_ignores_type_hints() -> None:
    # The check itself must fail where it should: each of these is SQL on a job table.
    for source in (
        ("from sqlalchemy import select\nfrom loom.models import Item\n"
         "def f(s):\n    return s.scalars(select(Item))\n"),
        "def f(s):\n    from loom.models import Job as J\n    return s.get(J, 'x')\n",
        "from loom import models\ndef f(s):\n    return s.query(models.Output).all()\n",
        ("import loom.models\ndef f(s):\n"
         "    s.execute(update(loom.models.Item).values(status='queued'))\n"),
        "from loom.models import Event\ndef f(s):\n    s.execute(insert(Event.__table__), [])\n",
        "from loom.models import Job\ndef f(s):\n    s.add(Job(id='x'))\n",
        ("from sqlalchemy import func, select\nfrom loom.models import Item\n"
         "def f(s):\n    return s.scalar(select(func.count(Item.id)))\n"),
        "from sqlalchemy import text\ndef f(s):\n    s.execute(text('DELETE FROM items'))\n",
    ):
        assert job_table_statements(source), source
    for source in (
        "from loom.models import Job\ndef f(job: Job) -> Job:\n    return job\n",
        "from loom.models import Tenant\ndef f(s):\n    return s.scalars(select(Tenant))\n",
        "from loom import jobs\ndef f(s):\n    return jobs.get_job(s, job_id='x')\n",
        "def f(d, job):\n    d.update(job.params)\n",
    ):
        assert not job_table_statements(source), source
