"""The model stage: models cached per process by name, and one batched call per batch.

Model problems never take the worker down: an unknown model fails its items with
``unsupported_task``; a load or inference exception becomes ``ModelError`` (transient, so the
items are retried - alone, the second time - up to the attempt cap).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from loom import tasks
from loom.config import Settings
from loom.errors import InvalidInput, LoomError, ModelError, UnsupportedTask
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
        from loom import jobs

        key = (
            str(info_field(info, "name", "")),
            str(info_field(info, "version", "")),
            str(info_field(info, "weights_sha256", "")),
        )
        if key in self._recorded_versions:
            return
        tasks_ = [str(t) for t in (info_field(info, "tasks", ()) or ())]
        with self.session_factory() as session:
            jobs.record_model_version(session, name=key[0], version=key[1],
                                      weights_sha256=key[2], tasks=tasks_)
        self._recorded_versions.add(key)


def _permanent_model_errors() -> tuple[type[BaseException], ...]:
    try:
        from pipeline.errors import UnsupportedParamError, UnsupportedTaskError
    except Exception:  # pragma: no cover - pipeline not importable
        return ()
    return (UnsupportedParamError, UnsupportedTaskError)


def infer(
    models: ModelCache, prepared: list[Prepared]
) -> tuple[list[tuple[Prepared, Any]], list[Prepared], Any, float]:
    """Run the model once for the batch's good items, calling the method their task's spec
    names with the arguments it lists. Returns (outputs, failed, info, ms)."""
    from pipeline import serving

    good = [p for p in prepared if p.ok]
    bad = [p for p in prepared if not p.ok]
    if not good:
        return [], bad, None, 0.0
    first = good[0].item
    spec = tasks.get(first.task)
    params = spec.model_params(first.params)
    try:
        model = models.get(first.model_name)
        info = model.info
        serving.check_call(_Declared(info), spec.name, params)
    except LoomError as exc:
        _fail(good, exc)
        return [], bad + good, None, 0.0
    except _permanent_model_errors() as exc:
        # The request asked for something this model cannot do: no retry will change that.
        _fail(good, UnsupportedTask(f"model {first.model_name!r}: {exc}"))
        return [], bad + good, None, 0.0
    if spec.texts:
        good, unreadable = _readable(model, first.model_name, spec.texts, good)
        bad = bad + unreadable
        if not good:
            return [], bad, info, 0.0
    # The same input twice in one batch (same bytes, texts and seed) is inferred once.
    slot: dict[tuple[Any, ...], int] = {}
    unique: list[Prepared] = []
    for p in good:
        key = (p.input_sha256, tuple(p.texts.values()), p.seed)
        if key not in slot:
            slot[key] = len(unique)
            unique.append(p)
    args: list[list[Any]] = []
    if spec.image:
        args.append([p.image for p in unique])
    args.extend([p.texts[name] for p in unique] for name in spec.texts)
    if spec.seeded:
        args.append([p.seed for p in unique])
    t0 = time.perf_counter()
    try:
        outs_unique = serving.run(model, spec.method, args, params)
        outs = [outs_unique[slot[(p.input_sha256, tuple(p.texts.values()), p.seed)]]
                for p in good]
    except Exception as exc:
        err = ModelError(
            f"model {first.model_name!r} failed on {spec.name}: {type(exc).__name__}: {exc}"
        )
        _fail(good, err)
        return [], bad + good, None, (time.perf_counter() - t0) * 1000.0
    return list(zip(good, outs, strict=True)), bad, info, (time.perf_counter() - t0) * 1000.0


def _readable(model: Any, model_name: str, fields: tuple[str, ...],
              good: list[Prepared]) -> tuple[list[Prepared], list[Prepared]]:
    """Split off the items whose prompt or question uses words the model cannot read: each fails
    ``invalid_input`` naming them (a closed-vocabulary model would otherwise read them as <unk>
    and draw or answer something unrelated)."""
    from pipeline import serving

    ok: list[Prepared] = []
    failed: list[Prepared] = []
    for p in good:
        for name in fields:
            unknown = serving.unknown_words(model, p.texts[name])
            if unknown:
                words = ", ".join(repr(w) for w in unknown[:10])
                more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
                vocab = " ".join(serving.vocabulary(model))
                p.error = InvalidInput(
                    f"{model_name} does not know the word(s) {words}{more} in the {name}"
                    + (f"; it knows: {vocab}" if vocab else ""))
                failed.append(p)
                break
        else:
            ok.append(p)
    return ok, failed


def _fail(good: list[Prepared], err: LoomError) -> None:
    for p in good:
        p.error = err


class _Declared:
    """A model's info as the serving seam reads it (tolerates infos without ``params``)."""

    def __init__(self, info: Any) -> None:
        self.name = str(info_field(info, "name", "model"))
        self.version = str(info_field(info, "version", ""))
        self.weights_sha256 = str(info_field(info, "weights_sha256", ""))
        declared = info_field(info, "tasks", None)
        self.tasks = tuple(tasks.names() if declared is None else declared)
        self.params = dict(info_field(info, "params", {}) or {})
