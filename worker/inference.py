"""The model stage: models cached per process by name, and one batched call per batch.

Model problems never take the worker down: an unknown model fails its items with
``unsupported_task``; a load or inference exception becomes ``ModelError`` (transient, so the
items are retried - alone, the second time - up to the attempt cap).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from loom.config import Settings
from loom.errors import LoomError, ModelError, UnsupportedTask
from loom.models import ModelVersion
from worker.inputs import Prepared
from worker.outputs import info_field

ModelLoader = Callable[[str], Any]  # model name -> model (caption/answer/generate + .info)


def _unknown_model_error() -> tuple[type[BaseException], ...]:
    try:
        from pipeline.errors import UnknownModelError
    except Exception:  # pragma: no cover - pipeline not importable
        return ()
    return (UnknownModelError,)


class ModelCache:
    """Models of this process by name (``pipeline.registry.load(name, device=settings.device)``
    unless a loader is given); records a ModelVersion row once per loaded model."""

    def __init__(
        self,
        settings: Settings,
        *,
        session_factory: sessionmaker[Session],
        model_loader: ModelLoader | None = None,
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self._model_loader = model_loader
        self._models: dict[str, Any] = {}
        self._model_errors: dict[str, LoomError] = {}
        self._recorded_versions: set[tuple[str, str, str]] = set()

    def get(self, name: str) -> Any:
        """The model called ``name``, loaded once per process; raises a LoomError for items."""
        if name in self._models:
            return self._models[name]
        if name in self._model_errors:
            raise self._model_errors[name]
        try:
            if self._model_loader is not None:
                model = self._model_loader(name)
            else:
                from pipeline import registry

                model = registry.load(name, device=self.settings.device)
        except _unknown_model_error() as exc:
            err = UnsupportedTask(f"unknown model {name!r}: {exc}")
            self._model_errors[name] = err  # will not appear later in this process
            raise err from exc
        except LoomError:
            raise
        except Exception as exc:
            raise ModelError(f"cannot load model {name!r}: {type(exc).__name__}: {exc}") from exc
        self._models[name] = model
        self._record_model_version(model.info)
        return model

    def _record_model_version(self, info: Any) -> None:
        key = (
            str(info_field(info, "name", "")),
            str(info_field(info, "version", "")),
            str(info_field(info, "weights_sha256", "")),
        )
        if key in self._recorded_versions:
            return
        tasks = [str(t) for t in (info_field(info, "tasks", ()) or ())]
        with self.session_factory() as session:
            exists = session.scalar(
                select(ModelVersion.id).where(
                    ModelVersion.name == key[0],
                    ModelVersion.version == key[1],
                    ModelVersion.weights_sha256 == key[2],
                )
            )
            if exists is None:
                session.add(
                    ModelVersion(name=key[0], version=key[1], weights_sha256=key[2], tasks=tasks)
                )
                try:
                    session.commit()
                except Exception:  # another process recorded it first (unique constraint)
                    session.rollback()
        self._recorded_versions.add(key)


def infer(
    models: ModelCache, prepared: list[Prepared]
) -> tuple[list[tuple[Prepared, Any]], list[Prepared], Any, float]:
    """Run the model once for the batch's good items. Returns (outputs, failed, info, ms)."""
    good = [p for p in prepared if p.ok]
    bad = [p for p in prepared if not p.ok]
    if not good:
        return [], bad, None, 0.0
    first = good[0].item
    task, params = first.task, dict(first.params or {})
    try:
        model = models.get(first.model_name)
        info = model.info
        tasks = info_field(info, "tasks", None)
        if tasks is not None and task not in tasks:
            raise UnsupportedTask(f"model {first.model_name!r} does not support task {task!r}")
    except LoomError as exc:
        for p in good:
            p.error = exc
        return [], bad + good, None, 0.0
    kwargs: dict[str, Any] = {}
    if task in ("caption", "vqa") and isinstance(params.get("beams"), int):
        kwargs["beams"] = params["beams"]
    t0 = time.perf_counter()
    try:
        if task == "caption":
            outs = model.caption([p.image for p in good], **kwargs)
        elif task == "vqa":
            outs = model.answer([p.image for p in good], [p.question for p in good], **kwargs)
        else:
            outs = model.generate([p.prompt for p in good], [p.seed for p in good])
        outs = list(outs)
        if len(outs) != len(good):
            raise ValueError(f"model returned {len(outs)} outputs for {len(good)} inputs")
    except Exception as exc:
        err = ModelError(
            f"model {first.model_name!r} failed on {task}: {type(exc).__name__}: {exc}"
        )
        for p in good:
            p.error = err
        return [], bad + good, None, (time.perf_counter() - t0) * 1000.0
    return list(zip(good, outs, strict=True)), bad, info, (time.perf_counter() - t0) * 1000.0
