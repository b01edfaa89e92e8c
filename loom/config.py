"""One settings object, read once from ``LOOM_*`` environment variables and passed in."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOOM_", extra="ignore")

    home: Path = Path("./.loom")
    database_url: str = ""  # default derived from home
    broker_url: str = "redis://localhost:6379/0"
    storage_url: str = ""  # default derived from home: file://$LOOM_HOME/store
    s3_endpoint_url: str | None = None
    auth: Literal["on", "off"] = "on"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    api_url: str | None = None
    api_key: str | None = None

    # Models and batching.
    default_model: str = "loom-shapes"
    # openai: models (any OpenAI-compatible server): the NAME of the environment variable that
    # holds the API key (read by the worker when it loads the model; never stored or logged),
    # the request timeout, and the most requests one worker process keeps in flight per
    # endpoint (the adaptive window grows to it on success and halves on 429/503).
    openai_api_key_env: str = "OPENAI_API_KEY"
    openai_timeout_seconds: float = Field(default=120.0, gt=0)
    openai_max_in_flight: int = Field(default=64, ge=1)
    batch_size: int = Field(default=32, ge=1)
    chunk_batches: int = Field(default=4, ge=1)  # chunk size = chunk_batches * batch_size
    # A worker process claims this many batches per claim statement and runs them one by one:
    # the claim's fixed cost (two statements, a lease per item, the job's head) is paid once per
    # claim_batches batches. Measured +2% caption, +9% generate at 2 (bench/eta.py, local).
    claim_batches: int = Field(default=2, ge=1)
    # After its own chunk runs dry, a worker process goes on claiming the job's other queued
    # items for up to this long (their messages then ack at once): no pipeline drain and no
    # broker round trip at every chunk boundary. 0: a process claims from its chunk only.
    chunk_linger_seconds: float = Field(default=10.0, ge=0)
    # Within that time, once its own job has nothing left to claim, a process tops its batches
    # up with fresh items of other jobs one model call can serve (loom.jobs.fill): small jobs
    # run in full batches. PostgreSQL only.
    batch_fill: bool = True
    # Host sizing (worker.sizing): None = planned from the usable cores / visible GPUs.
    worker_processes: int | None = Field(default=None, ge=1)  # model processes per invocation
    torch_threads: int | None = Field(default=None, ge=1)  # torch threads per model process
    # On a CPU host, at most cores // threads model processes (of every invocation) run a chunk
    # at once; the others wait for a run token. Off for workers whose model is mostly waiting
    # (an ``openai:`` backend) and that run more processes than cores on purpose.
    host_run_tokens: bool = True
    embedded_processes: int | None = Field(default=None, ge=1)  # engine processes of `loom caption`...
    stage_log: Path | None = None  # engines write their stage times here (bench/eta.py)

    # Leases, retries and the reconciler.
    lease_seconds: float = Field(default=120.0, gt=0)
    heartbeat_seconds: float = Field(default=30.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    retry_backoff_seconds: float = Field(default=5.0, ge=0)
    reconcile_interval_seconds: float = Field(default=30.0, gt=0)
    stale_chunk_seconds: float = Field(default=300.0, gt=0)
    # Redis' visibility timeout: longer than any chunk; the hard time limit stays below it.
    visibility_timeout_seconds: int = Field(default=4 * 3600, gt=0)
    task_time_limit_seconds: int = Field(default=3 * 3600, gt=0)
    # The orphan sweep (loom/orphans.py): job folders in the store with no job row, older than
    # the grace period, are deleted by the workers' reconciler this often (0: never).
    orphan_sweep_interval_seconds: float = Field(default=3600.0, ge=0)
    orphan_grace_seconds: float = Field(default=3600.0, gt=0)

    # Inputs.
    allow_private_urls: bool = False
    fetch_timeout_seconds: float = Field(default=10.0, gt=0)
    max_input_bytes: int = Field(default=20 * 1024 * 1024, gt=0)
    max_image_pixels: int = Field(default=40_000_000, gt=0)

    # API limits.
    max_body_bytes: int = Field(default=50 * 1024 * 1024, gt=0)
    # POST /v1/files only (streamed to storage, so memory does not grow with it).
    max_file_bytes: int = Field(default=2 * 1024**3, gt=0)
    max_items_per_request: int = Field(default=10_000, ge=1)
    max_text_chars: int = Field(default=500, ge=1)
    # The OpenAI-compatible API (/openai/v1), with OpenAI's Batch API limits as defaults:
    # requests (lines) per batch input file, bytes per uploaded file, and how long a synchronous
    # chat/embeddings/images call waits for its job before it is cancelled (504).
    openai_batch_max_lines: int = Field(default=50_000, ge=1)
    openai_file_max_bytes: int = Field(default=200 * 1024**2, gt=0)
    openai_wait_seconds: float = Field(default=120.0, gt=0)
    # Tenant limits (loom/jobs/limits.py), the defaults of every tenant; `loom tenants limits`
    # overrides them per tenant. Unset: no limit. Over the open-item or per-minute limit a
    # submission gets 429 with Retry-After, over the per-job size 413; max running items caps
    # a tenant's items in flight across the fleet (enforced where workers claim).
    tenant_max_queued_items: int | None = Field(default=None, ge=1)
    tenant_max_running_items: int | None = Field(default=None, ge=1)
    tenant_submissions_per_minute: int | None = Field(default=None, ge=1)
    tenant_max_items_per_job: int | None = Field(default=None, ge=1)
    tenant_weight: float = Field(default=1.0, gt=0)
    # Fair share (loom/jobs/shares.py, PostgreSQL): when several tenants wait for one model,
    # claims are shared by weight over this window; jobs of at most fast_lane_max_items items
    # go first, but take at most fast_lane_max_share of the claims while bulk work waits.
    fair_share: bool = True
    fair_share_window_seconds: float = Field(default=10.0, gt=0)
    fast_lane_max_items: int = Field(default=16, ge=0)
    fast_lane_max_share: float = Field(default=0.5, gt=0, le=1)
    # An admin token (Bearer) for /v1/admin (tenant limits and use); unset: the admin API is off.
    admin_token: str | None = None
    # /metrics counts every tenant's jobs: with auth on it needs this token as a Bearer (unset:
    # /metrics is off). Prometheus sends it with `authorization: {credentials: ...}`.
    metrics_token: str | None = None

    @model_validator(mode="after")
    def _derive_defaults(self) -> "Settings":
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.home / 'loom.db').resolve()}"
        if not self.storage_url:
            self.storage_url = f"file://{(self.home / 'store').resolve()}"
        if self.visibility_timeout_seconds <= self.task_time_limit_seconds:
            raise ValueError(
                "LOOM_VISIBILITY_TIMEOUT_SECONDS must exceed LOOM_TASK_TIME_LIMIT_SECONDS, "
                "or Redis redelivers chunks that are still running"
            )
        return self

    @property
    def chunk_size(self) -> int:
        return self.batch_size * self.chunk_batches

    @property
    def auth_enabled(self) -> bool:
        return self.auth == "on"
