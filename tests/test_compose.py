"""docker-compose.yml, checked without a Docker engine: every service's command must refer to
something that exists (loom subcommands in the Typer app, modules, the build context and its
Dockerfile), every LOOM_* variable must be a Settings field, and Redis must be configured for a
queue (appendonly, noeviction)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def cli() -> Any:
    import typer.main

    from worker.cli import app

    return typer.main.get_command(app)


def _loom_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose["services"].items() if s.get("image", "").startswith("loom")}


def _env_names(env: Any) -> set[str]:
    if isinstance(env, dict):
        return set(env)
    return {e.split("=", 1)[0] for e in env or []}


def test_expected_services(compose: dict[str, Any]) -> None:
    assert {"redis", "postgres", "minio", "minio-init", "migrate", "api", "worker", "flower"} <= set(
        compose["services"]
    )


def test_build_context_and_dockerfile_exist(compose: dict[str, Any]) -> None:
    builds = [s["build"] for s in compose["services"].values() if "build" in s]
    assert builds, "some service must build the loom image"
    for build in builds:
        context = ROOT / build.get("context", ".")
        assert context.is_dir()
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        assert dockerfile.is_file()
        text = dockerfile.read_text()
        assert 'ENTRYPOINT ["loom"]' in text
        for arg in build.get("args", {}):
            assert re.search(rf"^ARG {arg}\b", text, re.M), f"Dockerfile lacks ARG {arg}"
        for src in re.findall(r"^COPY (\S+)", text, re.M):
            if not src.startswith("--"):
                assert (context / src).exists(), f"COPY {src}: missing"


def test_loom_commands_exist(compose: dict[str, Any], cli: Any) -> None:
    services = _loom_services(compose)
    assert {"migrate", "api", "worker"} <= set(services)
    for name, svc in services.items():
        if "entrypoint" in svc:  # not the loom CLI: checked below
            continue
        command = svc["command"]
        assert isinstance(command, list), name
        group = cli
        for word in command:
            if word.startswith("-"):
                break
            sub = getattr(group, "commands", {}).get(word)
            assert sub is not None, f"{name}: `loom {' '.join(command)}`: no command {word!r}"
            group = sub
        options = {o for p in group.params for o in getattr(p, "opts", [])}
        allows_extra = group.context_settings.get("allow_extra_args", False)
        for word in command:
            if word.startswith("--") and not allows_extra:
                assert word.split("=")[0] in options, f"{name}: unknown option {word}"


def test_celery_entrypoints_name_real_modules(compose: dict[str, Any]) -> None:
    for name, svc in _loom_services(compose).items():
        entry = svc.get("entrypoint")
        if not entry:
            continue
        assert entry[0] == "celery", name
        module = entry[entry.index("-A") + 1]
        assert importlib.util.find_spec(module) is not None, f"{name}: no module {module}"
        assert importlib.util.find_spec(entry[entry.index("-A") + 2]) is not None


def test_loom_env_vars_are_settings_fields(compose: dict[str, Any]) -> None:
    from loom.config import Settings

    fields = {f"LOOM_{n.upper()}" for n in Settings.model_fields}
    seen: set[str] = set()
    for svc in compose["services"].values():
        seen |= {n for n in _env_names(svc.get("environment")) if n.startswith("LOOM_")}
    example = (ROOT / ".env.example").read_text()
    seen |= set(re.findall(r"^(LOOM_[A-Z_]+)=", example, re.M))
    seen -= {"LOOM_BUCKET"}  # compose-only: the bucket minio-init creates
    assert seen, "no LOOM_* variables found"
    assert seen <= fields, f"not Settings fields: {sorted(seen - fields)}"
    for var in ("LOOM_DATABASE_URL", "LOOM_BROKER_URL", "LOOM_STORAGE_URL"):
        assert var in seen


def test_redis_is_a_durable_queue(compose: dict[str, Any]) -> None:
    command = " ".join(compose["services"]["redis"]["command"])
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command


def test_worker_reserves_a_gpu_and_has_a_cpu_fallback(compose: dict[str, Any]) -> None:
    devices = compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d.get("capabilities", []) for d in devices)
    cpu = compose["services"]["worker-cpu"]
    assert cpu["environment"]["LOOM_DEVICE"] == "cpu"
    assert "deploy" not in cpu


def test_bucket_is_created_and_matches_storage_url(compose: dict[str, Any]) -> None:
    init = compose["services"]["minio-init"]
    assert init["image"].startswith("minio/mc")
    assert "mc mb" in " ".join(init["command"])
    storage = compose["x-loom-env"]["LOOM_STORAGE_URL"]
    bucket = init["environment"]["LOOM_BUCKET"]
    assert re.search(r"s3://loom/", storage) and "loom" in bucket


def test_readme_documents_every_setting_and_the_demo_command() -> None:
    from loom.config import Settings

    readme = (ROOT / "README.md").read_text()
    for name in Settings.model_fields:
        assert f"| {name} | `LOOM_{name.upper()}` |" in readme, f"README lacks {name}"
    makefile = ROOT / "Makefile"
    if makefile.exists():  # the quickstart's command is what `make demo` runs
        demo = makefile.read_text().split("\ndemo:", 1)[1].split("\n\n", 1)[0]
        command = demo.strip().splitlines()[-1].strip().replace("$(BIN)", ".venv/bin")
        assert command in readme, command


def test_flower_requires_basic_auth_and_is_not_published_openly(compose: dict[str, Any]) -> None:
    flower = compose["services"]["flower"]
    auth = flower["environment"]["FLOWER_BASIC_AUTH"]
    # ${VAR:?message}: compose refuses to start without it (no default credentials).
    assert auth.startswith("${FLOWER_BASIC_AUTH:?")
    for port in flower.get("ports", []):
        assert str(port).startswith("127.0.0.1:"), port
    env_example = (ROOT / ".env.example").read_text()
    assert re.search(r"^FLOWER_BASIC_AUTH=\S+:\S+$", env_example, re.M)
