"""Pydantic request and response models of the HTTP API (they are the OpenAPI schema).

Static shape checks live here; limits that depend on Settings (items per request, text length)
are checked in ``api.service`` so that their messages can name the item index.
"""

from __future__ import annotations

import math
from datetime import date, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from loom import tasks

# Derived from the task registry: a new TaskSpec is a new accepted task and its text inputs
# become item fields, with no edit here.
TaskName = Literal[tuple(tasks.names())]  # type: ignore[valid-type]
ResultFormat = Literal["jsonl", "csv", "coco", "parquet", "webdataset"]
ResultView = Literal["full", "table"]
TEXT_INPUTS = tuple(dict.fromkeys(t for spec in tasks.inference() for t in spec.texts))


def json_problem(value: Any) -> str | None:
    """Why ``value`` cannot be stored and sent back as strict JSON (UTF-8, RFC 8259), or None.

    Python's json module accepts NaN/Infinity and lone-surrogate escapes ("\\ud800") on input,
    but PostgreSQL's jsonb and every UTF-8 encoder refuse them later, far from the request."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            shown = "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
            return f"{shown} at {path or 'the value'} is not JSON (no NaN or Infinity)"
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return f"{path or 'the text'} contains a lone surrogate (not valid Unicode text)"
        elif isinstance(v, dict):
            for k, sub in v.items():
                key = str(k)
                try:
                    key.encode("utf-8")
                except UnicodeEncodeError:
                    return f"a key in {path or 'the object'} contains a lone surrogate"
                stack.append((f"{path}.{key}" if path else key, sub))
        elif isinstance(v, list | tuple):
            stack.extend((f"{path}[{i}]", sub) for i, sub in enumerate(v))
    return None


class JsonSafeModel(BaseModel):
    """Every field of a request model must be strict JSON: checked once, here, for all of them."""

    @field_validator("*", mode="after")
    @classmethod
    def _json_safe(cls, value: Any) -> Any:
        if isinstance(value, BaseModel):  # nested request models check their own fields
            return value
        problem = json_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value


class ErrorBody(BaseModel):
    code: str = Field(description="Stable error code (loom.errors); item rows use the same codes.")
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class _ItemBase(JsonSafeModel):
    model_config = ConfigDict(extra="forbid")


ItemIn = create_model(
    "ItemIn",
    __base__=_ItemBase,
    __doc__="One unit of work: an image source (image_url | image_key | image_base64) for the "
    "tasks that take an image, plus the task's text inputs (" + ", ".join(
        f"{s.name}: {', '.join(s.texts) or 'none'}" for s in tasks.inference()) + ").",
    image_url=(str | None, Field(
        None, description="http(s) URL fetched by the worker (through the SSRF guard).")),
    image_key=(str | None, Field(
        None, description="Storage key of an image already uploaded under your tenant prefix.")),
    image_base64=(str | None, Field(
        None, description="The image bytes, base64; stored at submission.")),
    **{name: (str | None, None) for name in TEXT_INPUTS},  # type: ignore[arg-type]
    metadata=(dict[str, Any] | None, Field(None, description="Returned with the result as is.")),
    seed=(int | None, Field(None, ge=0, le=tasks.SEED_MAX,
                            description="Seeded tasks: this item's seed.")),
)


class JobRequest(JsonSafeModel):
    """A job: inline ``items`` or ``manifest_key`` (a JSONL of items already in storage)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "task": "caption",
                    "model": "loom-shapes",
                    "items": [{"image_url": "https://example.com/cat.png"}],
                }
            ]
        },
    )

    task: TaskName
    model: str | None = Field(
        None, min_length=1, max_length=200, description="Model name; default: the server's."
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="Task parameters, e.g. {'seed': 7} for generate (item i then uses seed+i).",
    )
    items: list[ItemIn] | None = None
    manifest_key: str | None = Field(None, min_length=1, max_length=1024)
    priority: int = Field(0, ge=0, le=9, description="0 (default) .. 9 (most urgent).")
    webhook_url: str | None = Field(None, max_length=2048)
    webhook_events: list[Literal["started", "progress", "completed"]] | None = Field(
        None, max_length=3,
        description="Webhook events to send (default ['completed']); signed, see README.")
    parent_job_id: str | None = Field(None, max_length=64)
    metadata: dict[str, Any] | None = None
    cache: bool = Field(
        True, description="Reuse earlier outputs for the same input, task, model weights, "
        "params and seed (marked cached, no inference); false infers every item.")

    @model_validator(mode="after")
    def _one_source(self) -> "JobRequest":
        if (self.items is None) == (self.manifest_key is None):
            raise ValueError("give exactly one of 'items' or 'manifest_key'")
        return self


class ItemError(BaseModel):
    code: str
    message: str | None = None


class QueueOut(BaseModel):
    """Where a waiting job stands (loom.jobs.shares.queue_place)."""

    items_ahead: int = Field(description="Items the fleet runs before this job's, by share.")
    own_items_ahead: int = Field(description="Open items of the tenant's earlier jobs.")
    other_items_ahead: int = Field(description="Other tenants' items interleaved meanwhile.")
    share: float = Field(description="This tenant's share of the fleet among those waiting.")
    reason: str


class JobOut(BaseModel):
    id: str
    task: str
    model: str
    status: str
    priority: int
    params: dict[str, Any]
    metadata: dict[str, Any] | None = None
    parent_job_id: str | None = None
    webhook_url: str | None = None
    cache: bool = True
    item_count: int
    counts: dict[str, int] = Field(description="Items per status.")
    done: int = Field(description="Items in a terminal status.")
    progress: float = Field(description="done / item_count, 0..1.")
    items_per_second: float | None = None
    eta_seconds: float | None = None
    queue: QueueOut | None = Field(default=None, description="Set while the job waits.")
    error: ItemError | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime | None = None


class JobList(BaseModel):
    jobs: list[JobOut]
    next_cursor: str | None = None


class OutputOut(BaseModel):
    id: int
    kind: str
    text: str | None = None
    url: str | None = Field(None, description="Presigned (S3) or /v1/outputs/{id}/content URL.")
    content_type: str | None = None
    sha256: str | None = None
    size_bytes: int | None = None


class ItemOut(BaseModel):
    id: int
    index: int
    status: str
    input: dict[str, Any]
    metadata: dict[str, Any] | None = None
    attempts: int
    error: ItemError | None = None
    output: OutputOut | None = None
    cached: bool = Field(False, description="Answered by an earlier output, not inferred.")
    started_at: datetime | None = None
    finished_at: datetime | None = None


class ItemList(BaseModel):
    items: list[ItemOut]
    next_cursor: str | None = None


class RetryOut(BaseModel):
    job: JobOut
    requeued: int


class DedupeMember(BaseModel):
    index: int
    file: str | None
    input_sha256: str | None
    keep: bool = Field(description="The member to keep: the group's lowest index.")
    match: Literal["first", "exact", "near"] = Field(
        description="exact: same input sha256 as the kept member; near: by cosine.")
    score: float = Field(description="Cosine to the kept member.")


class DedupeGroup(BaseModel):
    group: int
    size: int
    members: list[DedupeMember]


class DedupeOut(BaseModel):
    job_id: str
    threshold: float
    vectors: int = Field(description="Succeeded items with a vector.")
    duplicates: int = Field(description="Members that are not kept, over all groups.")
    groups: list[DedupeGroup]


class OutputProblemOut(BaseModel):
    item_id: int
    index: int
    problem: str  # "missing" | "corrupt"
    storage_key: str | None
    expected_sha256: str | None
    actual_sha256: str | None


class VerifyReportOut(BaseModel):
    job_id: str
    checked: int
    ok: bool
    missing: int
    corrupt: int
    requeued: int
    problems: list[OutputProblemOut]


class VerifyOut(BaseModel):
    job: JobOut
    report: VerifyReportOut


class FinetuneRequest(JsonSafeModel):
    """A finetune job: labelled rows in, a registered model version out (loom.finetune)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{
            "rows_key": "TENANT/files/ROWS.jsonl", "name": "shapes-ext", "base": "loom-shapes",
            "hyper": {"steps": 1500}, "val_fraction": 0.1}]},
    )

    rows_key: str = Field(max_length=2048, description=(
        "A JSONL uploaded with POST /v1/files: one row per line, {\"image_key\" (an uploaded "
        "image's key), \"caption\"?, \"question\"?, \"answer\"?}."))
    name: str = Field(max_length=64, description="The name to register; each job adds a "
                      "version (run it as NAME or NAME@vN).")
    base: str = Field(default="loom-shapes", max_length=200,
                      description="loom-shapes or one of your registered models.")
    hyper: dict[str, Any] = Field(default_factory=dict, description=(
        "steps (1500), lr (0.001), batch (32), replay (16), seed (0), ckpt_every (100)."))
    val_fraction: float = Field(default=0.1, ge=0, lt=0.5,
                                description="Rows held out to score the result.")


class ModelOut(BaseModel):
    name: str
    versions: list[dict[str, Any]] = Field(
        default_factory=list, description="Versions seen by workers (name, version, sha256)."
    )
    tasks: list[str] = Field(default_factory=list)
    ref: str | None = Field(None, description="A named model's reference (hf:, diffusers:, "
                                              "openai:), resolved when a job is submitted.")
    params: dict[str, Any] = Field(default_factory=dict, description="A named model's "
                                                                       "default job params.")


class ModelAliasIn(BaseModel):
    """Name a model brought by reference, for your tenant."""

    name: str
    backend: Literal["hf", "diffusers", "openai"]
    ref: str = Field(description="A model folder on the workers (hf, diffusers) or "
                                 "SERVED_NAME@BASE_URL (openai).")
    params: dict[str, Any] = Field(default_factory=dict)


class ModelList(BaseModel):
    models: list[ModelOut]


class Health(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)


class FileOut(BaseModel):
    """An uploaded file (OpenAI's file object, plus ``sha256`` and the storage ``key``: pass a
    manifest's key as ``manifest_key``, an image's as an item's ``image_key``)."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int | None = Field(description="Unix seconds.")
    filename: str
    purpose: Literal["manifest", "dataset", "image", "batch", "batch_output"]
    sha256: str
    key: str
    content_type: str | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileOut]
    next_cursor: str | None = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True



USAGE_ITEMS = ("Items by status: terminal items on the UTC day they finished, queued and running "
               "ones today (they are in flight now).")
USAGE_SECONDS = ("The model's time: each output's share of its batch's model call (infer_ms / "
                 "infer_batch_size), plus a finetune's train_ms; a cache reuse costs 0.")
USAGE_BYTES = ("Bytes of the outputs written (images, vectors, model weights, text); a cache "
               "reuse stores nothing new.")


class UsageTenant(BaseModel):
    id: str
    name: str


class UsageDay(BaseModel):
    day: date = Field(description="The UTC day.")
    model: str = Field(description="The model the jobs named.")
    items: dict[str, int] = Field(description=USAGE_ITEMS)
    model_seconds: float = Field(description=USAGE_SECONDS)
    bytes_stored: int = Field(description=USAGE_BYTES)


class UsageTotals(BaseModel):
    items: dict[str, int] = Field(description=USAGE_ITEMS)
    model_seconds: float = Field(description=USAGE_SECONDS)
    bytes_stored: int = Field(description=USAGE_BYTES)


class UsageOut(BaseModel):
    """Your tenant's usage per UTC day and model, ``since``..``until`` (inclusive)."""

    tenant: UsageTenant
    since: date
    until: date
    model: str | None = Field(None, description="The model asked for, if any.")
    days: list[UsageDay] = Field(description="Only days and models with items, oldest first.")
    total: UsageTotals
