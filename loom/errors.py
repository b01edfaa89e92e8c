"""Loom's one error hierarchy.

Every error carries a stable ``code``. The same codes are written to ``items.error_code`` and
returned by the HTTP API (``{"error": {"code": ..., "message": ...}}``), so a client can act on a
failed item and a failed request in the same way.
"""

from __future__ import annotations


class LoomError(Exception):
    """Base of every error Loom raises on purpose."""

    code: str = "internal_error"
    http_status: int = 500
    # Whether retrying the same work later may succeed (drives item retry vs. permanent failure).
    transient: bool = False

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


# --- request / input errors (the caller can fix these) -------------------------------------


class InvalidRequest(LoomError):
    code = "invalid_request"
    http_status = 422


class PayloadTooLarge(InvalidRequest):
    code = "payload_too_large"
    http_status = 413


class BadRequest(InvalidRequest):
    """A request that the OpenAI-compatible routes refuse with 400, as OpenAI does: a model that
    cannot do what is asked, a field Loom does not take. ``param`` names the field at fault."""

    http_status = 400

    def __init__(self, message: str, *, code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message, code=code)
        self.param = param


class JobTooLarge(PayloadTooLarge):
    """More items in one job than the tenant's ``max_items_per_job``: waiting does not help."""

    code = "job_too_large"


class LimitExceeded(LoomError):
    """A tenant limit (open items, submissions per minute) is reached: nothing of the request
    was accepted; it may be sent again after ``retry_after`` seconds (HTTP Retry-After)."""

    code = "limit_exceeded"
    http_status = 429
    transient = True

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = max(1.0, retry_after)


class InternalError(LoomError):
    """An unexpected failure (a bug): the API answers 500 ``internal_error`` and logs the cause."""

    code = "internal_error"
    http_status = 500


class NotFound(LoomError):
    code = "not_found"
    http_status = 404


class Unauthorized(LoomError):
    code = "unauthorized"
    http_status = 401


class Conflict(LoomError):
    code = "conflict"
    http_status = 409


class IdempotencyConflict(Conflict):
    code = "idempotency_conflict"


class InvalidState(Conflict):
    """The job or item is not in a state that allows the operation (e.g. cancel a finished job)."""

    code = "invalid_state"


# --- item errors (recorded on the item row; never fail the job or the worker) ----------------


class ItemError(LoomError):
    """An error that ends or delays one item."""

    http_status = 422


class InvalidInput(ItemError):
    """The input bytes are not a usable image: undecodable, truncated, empty, a bomb, wrong type."""

    code = "invalid_input"


class InputTooLarge(InvalidInput):
    code = "input_too_large"


class InvalidKey(ItemError):
    """A storage key outside the safe alphabet or shape ('..', '%2e', '//', a leading '/').

    Permanent: the same key is refused on every attempt (a 422 at submit, a failed item in a
    worker), unlike a store that is down (``StorageError``)."""

    code = "invalid_key"


class BlockedUrl(ItemError):
    """The URL resolves to an address the SSRF guard refuses."""

    code = "blocked_url"


class FetchFailed(ItemError):
    """The URL could not be fetched (timeouts, 5xx): worth another attempt."""

    code = "fetch_failed"
    transient = True


class InputMissing(ItemError):
    code = "input_missing"


class InputMismatch(InvalidInput):
    """The input read has another sha256 than the one the item expects (changed or corrupt)."""

    code = "input_mismatch"


class UnsupportedTask(ItemError):
    code = "unsupported_task"


class ModelError(ItemError):
    """The model raised on this item; retried, since it may be a transient device error."""

    code = "model_error"
    transient = True


class InvalidOutput(ItemError):
    """The model's reply does not match what the job asked for (a ``response_format`` JSON
    schema), after one retry."""

    code = "invalid_output"


class ModelRefused(ItemError):
    """A remote model endpoint refused the request for good (400/404/422: the request; 401/403:
    the credentials, after which the endpoint is not asked again for a while)."""

    code = "model_refused"


class StorageError(LoomError):
    """The object store failed; transient by default (throttling, network)."""

    code = "storage_error"
    http_status = 503
    transient = True


class WorkerLost(ItemError):
    """The item's lease expired on every attempt: the worker died while running it."""

    code = "worker_lost"


class AttemptsExhausted(ItemError):
    code = "attempts_exhausted"


class Cancelled(ItemError):
    code = "cancelled"


# --- infrastructure errors (an outage: never a property of an item) -------------------------


class InfrastructureError(LoomError):
    """A dependency (object store, database) is down or unreachable.

    Not an item error: the worker gives the batch's leases back without spending the items'
    attempts, waits for the dependency, and carries on. Never written to an item row."""

    code = "service_unavailable"
    http_status = 503
    transient = True


class StoreUnavailable(InfrastructureError):
    """A read or write on the object store failed for a reason other than a missing object or a
    bad key (connection refused, timeouts, 5xx, throttling)."""

    code = "store_unavailable"


class ServiceUnavailable(LoomError):
    code = "service_unavailable"
    http_status = 503
    transient = True


class WaitTimeout(LoomError):
    """A synchronous request's job did not finish in time (it is cancelled)."""

    code = "timeout"
    http_status = 504
    transient = True


# Codes that item rows may carry, for documentation and API schemas.
ITEM_ERROR_CODES: tuple[str, ...] = tuple(
    sorted(
        {
            cls.code
            for cls in (
                InvalidInput,
                InputTooLarge,
                InvalidKey,
                BlockedUrl,
                FetchFailed,
                InputMissing,
                InputMismatch,
                UnsupportedTask,
                ModelError,
                StorageError,
                WorkerLost,
                AttemptsExhausted,
                Cancelled,
            )
        }
        | {LoomError.code}
    )
)
