"""TEST-ONLY Celery entry point: the production worker, with a model that dies on one input.

``celery -A poison_worker worker`` (with tests/worker on PYTHONPATH) runs worker.app unchanged,
except that in each pool process ``pipeline.registry.load`` is wrapped so that the loaded model
kills its own process (``os._exit(137)``, like a segfault or the OOM killer) whenever a batch
contains the poison marker: a pure magenta 7x7 image. Production code knows nothing about this.
"""

from __future__ import annotations

import os
from typing import Any

from celery.signals import worker_process_init


def is_poison(image: Any) -> bool:
    if getattr(image, "size", None) != (7, 7):
        return False
    colours = image.convert("RGB").getcolors(maxcolors=2)
    return colours is not None and len(colours) == 1 and colours[0][1] == (255, 0, 255)


class PoisonedModel:
    def __init__(self, model: Any) -> None:
        self._model = model
        self.info = model.info

    def _maybe_die(self, images: list[Any]) -> None:
        if any(is_poison(im) for im in images):
            os._exit(137)

    def caption(self, images: list[Any], **kwargs: Any) -> list[str]:
        self._maybe_die(images)
        return self._model.caption(images, **kwargs)

    def answer(self, images: list[Any], questions: list[str], **kwargs: Any) -> list[str]:
        self._maybe_die(images)
        return self._model.answer(images, questions, **kwargs)

    def generate(self, prompts: list[str], seeds: list[int]) -> list[Any]:
        return self._model.generate(prompts, seeds)


# Connected BEFORE worker.tasks is imported, so it runs before the production handler that loads
# the model in the same signal.
@worker_process_init.connect
def _wrap_registry(**_: Any) -> None:
    from pipeline import registry

    real_load = registry.load

    def load(name: str, *args: Any, **kwargs: Any) -> Any:
        return PoisonedModel(real_load(name, *args, **kwargs))

    registry.load = load


import worker.tasks  # noqa: E402,F401  (connects the production handlers after ours)
from worker.app import app  # noqa: E402,F401
