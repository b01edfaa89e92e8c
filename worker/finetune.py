"""Running a finetune item: rows from storage -> pipeline.finetune -> weights -> the registry.

Called by the engine for the one item of a finetune job, on the model thread, while the engine's
lease keeper heartbeats the item's lease. Checkpoints go to the job's storage folder as they are
written, so when this worker is killed the lease expires, the next claim (another worker, or
``loom run JOB``) fetches the last checkpoint and resumes from its step. Progress (step, loss) is
recorded as ``progress`` events on the job; a cancel request stops training between steps.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from loom import finetune as spec
from loom import jobs, tasks
from loom.config import Settings
from loom.errors import InputMismatch, InvalidInput, LoomError, StorageError
from loom.jobs.types import add_events
from loom.models import utcnow
from loom.storage import model_key, training_key

if TYPE_CHECKING:  # pragma: no cover
    from loom.jobs import ClaimedItem, ItemResult
    from loom.storage import Store
    from worker.inference import ModelCache

log = logging.getLogger(__name__)

PROGRESS_EVERY_SECONDS = 5.0
CANCEL_CHECK_SECONDS = 2.0


def read_rows(data: bytes, *, store: Store, settings: Settings) -> list[Any]:
    """The rows manifest (JSON lines) -> pipeline rows with decoded images; a bad line is an
    invalid_input naming its line."""
    from loom import media
    from pipeline.finetune import Row
    from pipeline.preprocess import resize_to_model

    rows = []
    for n, line in enumerate(io.BytesIO(data), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            key = raw["image_key"]
            image = media.decode_image(store.get(key), max_pixels=settings.max_image_pixels)
        except LoomError as exc:
            if isinstance(exc, StorageError) and exc.transient:
                raise
            raise InvalidInput(f"rows line {n}: {exc.message}") from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidInput(f"rows line {n}: not a labelled row ({exc})") from exc
        texts = {k: raw.get(k) for k in ("caption", "question", "answer")}
        if not texts["caption"] and not (texts["question"] and texts["answer"]):
            raise InvalidInput(f"rows line {n}: needs a caption, or a question and an answer")
        rows.append(Row(resize_to_model(image), **texts))  # the model's size: 12 KB a row
    return rows


class _Base:
    """The base weights as a file, with their name, version and sha256."""

    def __init__(self, path: Path, name: str, version: str, sha256: str) -> None:
        self.path, self.name, self.version, self.sha256 = path, name, version, sha256


def base_weights(ref: str, *, tenant_id: str, models: ModelCache) -> _Base:
    """The base to fine-tune: a built-in model or one of the tenant's registered versions."""
    from pipeline import registry

    if ref in tasks.BUILTIN_MODELS:
        entry = registry.get(ref)
        registry.verify(entry)
        return _Base(entry.path, entry.name, entry.version, entry.sha256)
    found = models.registered(ref, tenant_id=tenant_id)
    if found is None:
        raise InvalidInput(f"base: unknown model {ref!r} (a built-in model, or one of your "
                           "registered models; see loom models)")
    path, m = found
    return _Base(path, m.name, f"v{m.version}", m.weights_sha256)


def run_finetune(item: ClaimedItem, *, settings: Settings,
                 session_factory: sessionmaker[Session], store: Store, models: ModelCache,
                 should_stop: Callable[[], bool]) -> ItemResult | None:
    """Train, store and register; the item's result, or None when stopped between steps."""
    import torch

    from pipeline import checkpoint
    from pipeline import finetune as ft

    inp = spec.check_input(item.input, error=InvalidInput)
    t0 = time.monotonic()
    data = store.get(inp["rows_key"])
    sha = hashlib.sha256(data).hexdigest()
    if sha != inp["rows_sha256"]:
        raise InputMismatch(f"rows sha256 is {sha}; the job expects {inp['rows_sha256']}")
    rows = read_rows(data, store=store, settings=settings)
    if len(rows) != inp["rows"]:
        raise InputMismatch(f"rows manifest holds {len(rows)} rows; the job expects "
                            f"{inp['rows']}")
    hyper = ft.Hyper(**inp["hyper"])
    order = list(range(len(rows)))
    random.Random(hyper.seed).shuffle(order)
    n_val = int(len(rows) * inp["val_fraction"])
    val = [rows[i] for i in order[:n_val]]
    train = [rows[i] for i in order[n_val:]] or val

    base = base_weights(inp["base"], tenant_id=item.tenant_id, models=models)
    module, tok, _ = checkpoint.load(base.path)
    run_dir = Path(settings.home) / "finetune" / item.job_id
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_key = training_key(item.tenant_id, item.job_id, "ckpt.pt")
    resumed = 0
    if store.exists(ckpt_key):
        (run_dir / "ckpt.pt").write_bytes(store.get(ckpt_key))
        resumed = int(torch.load(run_dir / "ckpt.pt", map_location="cpu",
                                 weights_only=True)["step"])
    _event(session_factory, item, "training_started",
           {"rows": len(rows), "train_rows": len(train), "val_rows": len(val),
            "base": f"{base.name}@{base.version}", "resumed_from_step": resumed,
            "attempt": item.attempts})

    last = {"t": 0.0}
    cancel = {"t": 0.0, "seen": False}

    def progress(p: ft.Progress) -> None:
        now = time.monotonic()
        if now - last["t"] >= PROGRESS_EVERY_SECONDS or p.step == p.steps:
            last["t"] = now
            _event(session_factory, item, "training",
                   {"step": p.step, "steps": p.steps, "loss": round(p.loss, 5),
                    **{k: round(v, 5) for k, v in p.losses.items() if k.startswith("user_")}})

    def stop() -> bool:
        if should_stop():
            return True
        now = time.monotonic()
        if now - cancel["t"] >= CANCEL_CHECK_SECONDS:
            cancel["t"] = now
            with session_factory() as session:
                status = jobs.job_status(session, job_id=item.job_id)
            cancel["seen"] = status in ("cancelling", "cancelled")
        return cancel["seen"]

    def keep(path: Path, step: int) -> None:
        store.put(ckpt_key, path.read_bytes())

    model, tok, finished = ft.finetune(module, tok, train, hyper=hyper, run_dir=run_dir,
                                       on_progress=progress, should_stop=stop,
                                       on_checkpoint=keep)
    if not finished:
        return None
    metrics: dict[str, Any] = {f"val_{k}": v for k, v in ft.score(model, tok, val).items()}
    metrics.update({"steps": hyper.steps, "train_rows": len(train),
                    "new_words": [w for w in tok.tokens if w not in _base_tokens(base.path)],
                    "seconds": round(time.monotonic() - t0, 1), "resumed_from_step": resumed})
    out = run_dir / "model.safetensors"
    weights_sha = checkpoint.save(out, model, tok, inp["name"], f"ft-{item.job_id[:8]}")
    key = model_key(item.tenant_id, inp["name"], item.job_id)
    payload = out.read_bytes()
    store.put(key, payload, "application/octet-stream")
    trained = jobs.Trained(
        name=inp["name"], base_model=f"{base.name}@{base.version}",
        base_weights_sha256=base.sha256, weights_key=key, weights_sha256=weights_sha,
        size_bytes=len(payload), training_sha256=inp["rows_sha256"], training_rows=len(rows),
        hyperparameters={**hyper.to_dict(), "val_fraction": inp["val_fraction"]},
        metrics=metrics)
    with session_factory() as session:
        registered = jobs.register_model(session, tenant_id=item.tenant_id,
                                         job_id=item.job_id, trained=trained)
        ref, version = registered.ref, registered.version
    _event(session_factory, item, "registered", {"model": ref, **metrics})
    shutil.rmtree(run_dir, ignore_errors=True)
    log.info("finetune %s: registered %s (%s)", item.job_id, ref, metrics)
    return jobs.ItemResult(
        item_id=item.id, kind="model", text=ref, storage_key=key,
        content_type="application/octet-stream", sha256=weights_sha, size_bytes=len(payload),
        input_sha256=inp["rows_sha256"], model_name=base.name, model_version=base.version,
        weights_sha256=base.sha256, seed=hyper.seed,
        timings={"train_ms": (time.monotonic() - t0) * 1000.0, "version": float(version)},
        attempt=item.attempts)


def _base_tokens(path: Path) -> set[str]:
    from pipeline import checkpoint
    from pipeline.tokenizer import Tokenizer

    return set(Tokenizer.from_json(checkpoint.read_metadata(path)["tokenizer"]).tokens)


def _event(session_factory: sessionmaker[Session], item: ClaimedItem, kind: str,
           detail: dict[str, Any]) -> None:
    with session_factory() as session:
        add_events(session, [{"job_id": item.job_id, "item_id": item.id, "kind": kind,
                                   "attempt": item.attempts,
                                   "message": json.dumps(detail)[:4000],
                                   "created_at": utcnow()}])
        session.commit()
