"""The typed seam between the worker and any model: what a serving model declares and offers.

A serving model is batched, in memory and free of I/O. It declares in ``info`` the tasks it
serves and, per task, the keyword parameters its method accepts; the worker checks a job's
params against that declaration before it calls the model, so an unsupported parameter is a
permanent error of the request, never a retried model failure. Both ``loom-shapes``
(``pipeline.model.ShapesModel``) and ``hf:`` models (``pipeline.hf.HFImageToText``) implement it.

A model with a closed vocabulary also offers ``unknown_words(text) -> list[str]`` and
``vocabulary() -> list[str]``: the worker
fails an item whose prompt or question uses a word the model cannot read (``invalid_input``, the
words named) instead of letting it answer or draw something unrelated. Open-vocabulary models
(``hf:``) leave it out.

Task -> method (the task registry, ``loom/tasks.py``, names the method of each task):
    caption  -> caption(images, **params)            -> list[str]
    vqa      -> answer(images, questions, **params)  -> list[str]
    generate -> generate(prompts, seeds, **params)   -> list[PIL.Image.Image]
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from PIL import Image

from pipeline.errors import UnsupportedParamError, UnsupportedTaskError


@runtime_checkable
class ServingInfo(Protocol):
    name: str
    version: str
    weights_sha256: str
    tasks: tuple[str, ...]
    params: Mapping[str, tuple[str, ...]]  # task -> accepted keyword parameters


@runtime_checkable
class ServingModel(Protocol):
    info: ServingInfo

    def caption(self, images: Sequence[Image.Image], **params: Any) -> list[str]: ...

    def answer(self, images: Sequence[Image.Image], questions: Sequence[str],
               **params: Any) -> list[str]: ...

    def generate(self, prompts: Sequence[str], seeds: Sequence[int],
                 **params: Any) -> list[Image.Image]: ...


def check_call(info: ServingInfo, task: str, params: Mapping[str, Any]) -> None:
    """Raise UnsupportedTaskError / UnsupportedParamError before a call the model cannot take."""
    if task not in info.tasks:
        raise UnsupportedTaskError(f"{info.name} does not serve task {task!r} "
                                   f"(it serves {', '.join(info.tasks)})")
    accepted = set(info.params.get(task, ()))
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise UnsupportedParamError(
            f"{info.name} does not take {unknown[0]!r} for task {task!r} "
            f"(it takes {', '.join(sorted(accepted)) or 'no parameters'})")


def unknown_words(model: Any, text: str) -> list[str]:
    """Words of ``text`` the model cannot read ([] when it declares no vocabulary)."""
    check = getattr(model, "unknown_words", None)
    return list(check(text)) if callable(check) else []


def vocabulary(model: Any) -> list[str]:
    """The words a closed-vocabulary model reads ([] for an open vocabulary)."""
    words = getattr(model, "vocabulary", None)
    return list(words()) if callable(words) else []


def run(model: ServingModel, method: str, args: Sequence[Sequence[Any]],
        params: Mapping[str, Any]) -> list[Any]:
    """One batched call of ``method`` with per-item argument lists (checked lengths)."""
    n = len(args[0]) if args else 0
    if any(len(a) != n for a in args):
        raise ValueError(f"argument lists of different lengths: {[len(a) for a in args]}")
    out = list(getattr(model, method)(*args, **params))
    if len(out) != n:
        raise ValueError(f"model returned {len(out)} outputs for {n} inputs")
    return out
