"""The model stage: models cached per process by name, and one batched call per batch.

Model problems never take the worker down: an unknown model fails its items with
``unsupported_task``; a load or inference exception becomes ``ModelError`` (transient, so the
items are retried - alone, the second time - up to the attempt cap).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from loom import tasks
from loom.config import Settings
from loom.errors import InvalidInput, LoomError, ModelError, UnsupportedTask
from worker.inputs import Prepared
from worker.model_info import info_field

if TYPE_CHECKING:  # pragma: no cover
    from loom.storage import Store

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
        store: Store | None = None,
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.store = store  # where registered (fine-tuned) models' weights live
        self._model_loader = model_loader
        self._models: dict[str, Any] = {}
        self._model_errors: dict[str, LoomError] = {}
        self._recorded_versions: set[tuple[str, str, str]] = set()

    def get(self, name: str, *, tenant_id: str | None = None) -> Any:
        """The model called ``name``, loaded once per process; raises a LoomError for items.
        A name that is no built-in and no ``hf:`` reference is looked up among ``tenant_id``'s
        registered models (a version registered later is loaded when it becomes the latest)."""
        own = tenant_id is not None and self._model_loader is None and not (
            name in tasks.BUILTIN_MODELS or tasks.backend_of(name) is not None)
        if own:
            return self._registered_model(name, tenant_id=str(tenant_id))
        if name in self._models:
            return self._models[name]
        if name in self._model_errors:
            raise self._model_errors[name]
        try:
            if self._model_loader is not None:
                model = self._model_loader(name)
            elif tasks.backend_of(name) == tasks.OPENAI_PREFIX:
                from worker.openai_model import load_openai

                s = self.settings
                model = load_openai(name, key_env=s.openai_api_key_env,
                                    timeout=s.openai_timeout_seconds,
                                    max_in_flight=s.openai_max_in_flight)
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

    def registered(self, ref: str, *, tenant_id: str) -> tuple[Path, Any] | None:
        """(local weights file, registry row) of the tenant's registered model ``ref``: fetched
        from the store once per host, its sha256 checked, kept under ``{home}/models``."""
        from loom import jobs

        with self.session_factory() as session:
            found = jobs.resolve_model(session, tenant_id=tenant_id, ref=ref)
            if found is not None:
                session.expunge(found)
        if found is None:
            return None
        path = Path(self.settings.home) / "models" / f"{found.weights_sha256}.safetensors"
        if not path.is_file():
            if self.store is None:
                raise ModelError(f"model {ref!r}: no store to fetch its weights from")
            data = self.store.get(found.weights_key)
            got = hashlib.sha256(data).hexdigest()
            if got != found.weights_sha256:
                raise ModelError(f"model {ref!r}: weights at {found.weights_key} have sha256 "
                                 f"{got}; the registry says {found.weights_sha256}")
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(data)
            tmp.replace(path)
        return path, found

    def _registered_model(self, ref: str, *, tenant_id: str) -> Any:
        # Jobs name a pinned version (NAME@vN, resolved at submit): known once, known for good.
        pinned = f"{tenant_id}/{ref}"
        if pinned in self._models:
            return self._models[pinned]
        try:
            found = self.registered(ref, tenant_id=tenant_id)
        except LoomError:
            raise
        except Exception as exc:
            raise ModelError(f"cannot fetch model {ref!r}: {type(exc).__name__}: {exc}") from exc
        if found is None:
            raise UnsupportedTask(f"unknown model {ref!r}: not a built-in model and not one "
                                  "of this tenant's registered models (see loom models)")
        path, m = found
        key = f"{tenant_id}/{m.name}@v{m.version}"
        if key in self._models:
            return self._models[key]
        try:
            from pipeline import registry

            model = registry.load_file(path, name=m.name, version=f"v{m.version}",
                                       sha256=m.weights_sha256, device=self.settings.device)
        except Exception as exc:
            raise ModelError(f"cannot load model {ref!r}: {type(exc).__name__}: {exc}") from exc
        if len(self._models) > 64:  # many tenants' models: keep memory bounded
            self._models.clear()
        self._models[key] = model
        if "@v" in ref:
            self._models[pinned] = model
        # Not recorded among the models seen: that list is every tenant's (GET /v1/models); a
        # registered model is its own tenant's (loom.jobs.registry).
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
        model = models.get(first.model_name, tenant_id=first.tenant_id)
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
        # A remote model is sent the exact bytes whose sha256 lineage records.
        raw = bool(getattr(model, "takes_bytes", False))
        args.append([p.raw if raw else p.image for p in unique])
    args.extend([p.texts[name] for p in unique] for name in spec.texts)
    if spec.seeded:
        args.append([p.seed for p in unique])
    for param in spec.params:  # prompts, seeds: one value per item
        if param.per_item and param.keyword in params:
            params[param.keyword] = [_PER_ITEM[param.name](p) for p in unique]
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
    ms = (time.perf_counter() - t0) * 1000.0
    if "n" in params:  # n outputs per item: each becomes the item's one output, with choices
        outs = [o if isinstance(o, BaseException) else _choices(first.model_name, o)
                for o in outs]
    # A backend may fail single items (a remote endpoint refused one request): an error in an
    # item's place fails that item alone.
    for p, out in zip(good, outs, strict=True):
        if isinstance(out, BaseException):
            p.error = out if isinstance(out, LoomError) else ModelError(
                f"model {first.model_name!r} failed on this item: {type(out).__name__}: {out}")
    return ([(p, o) for p, o in zip(good, outs, strict=True) if p.ok], bad + [
        p for p in good if not p.ok], info, ms)


# Where a per-item model param's value comes from (loom.task_params: ``per_item``).
_PER_ITEM: dict[str, Callable[[Prepared], Any]] = {
    "prompt": lambda p: p.texts.get("prompt"),
    "seed": lambda p: p.seed,
}


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


def _choices(model_name: str, out: Any) -> Any:
    """An item's n outputs as its one output (``worker.outputs.choices``); anything but a
    non-empty list fails that item, naming what came back."""
    from worker.outputs import choices

    if isinstance(out, (list, tuple)) and out:
        return choices(list(out))
    return ModelError(f"model {model_name!r} was asked for n outputs per item and returned "
                      f"{type(out).__name__} {str(out)[:60]!r} for this item, not a list")


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
