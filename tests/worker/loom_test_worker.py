"""TEST-ONLY Celery entry point: ``worker.app`` unchanged, except that when the trained weights
are not in pipeline/weights/ yet, each pool process serves the untrained architecture instead
(see model_source.py). The tests use plain ``worker.app`` once the weights are shipped."""

from __future__ import annotations

from typing import Any

from celery.signals import worker_process_init


# Connected BEFORE worker.tasks is imported, so it runs before the handler that loads the model.
@worker_process_init.connect
def _model_fallback(**_: Any) -> None:
    import model_source

    model_source.install()


import worker.tasks  # noqa: E402,F401  (connects the production handlers after ours)
from worker.app import app  # noqa: E402,F401
