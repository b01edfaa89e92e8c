"""The typed seam between the worker and any model: what a serving model declares and offers.

A serving model is batched, in memory and free of I/O. It declares in ``info`` the tasks it
serves and, per task, the keyword parameters its method accepts; the worker checks a job's
params against that declaration before it calls the model, so an unsupported parameter is a
permanent error of the request, never a retried model failure. ``loom-shapes``
(``pipeline.model.ShapesModel``), ``hf:`` models (``pipeline.hf.HFImageToText`` captioners,
``pipeline.hf_chat.HFChatVLM`` chat VLMs, ``pipeline.hf_embed.HFEmbedder`` CLIP/SigLIP) and
``diffusers:`` pipelines (``pipeline.diffusion.DiffusersTextToImage``) implement it; what a local
``hf:``/``diffusers:`` folder declares can be read without torch (``pipeline.hf_caps.describe``).

A model with a closed vocabulary also offers ``unknown_words(text) -> list[str]`` and
``vocabulary() -> list[str]``: the worker
fails an item whose prompt or question uses a word the model cannot read (``invalid_input``, the
words named) instead of letting it answer or draw something unrelated. Open-vocabulary models
(``hf:``) leave it out.

Task -> method (the task registry, ``loom/tasks.py``, names the method of each task):
    caption  -> caption(images, **params)            -> list[str]
    vqa      -> answer(images, questions, **params)  -> list[str]
    generate -> generate(prompts, seeds, **params)   -> list[PIL.Image.Image]
    embed    -> embed(images)                        -> list[np.ndarray]  float32, unit L2, (d,)
                embed_text(texts)                    -> list[np.ndarray]  same space (loom search)

The worker passes only the params a model declares for the task (``check_call`` refuses the
rest), always as keyword arguments, one list entry per item where a param is per item. Names
and meaning, the same for every model that declares them:
    prompts         caption: one instruction per image (the worker fills a job's template per
                    item); absent or None = the model's default instruction
    seeds           one int per item, used when sampling; an item's output never depends on
                    which other items share its batch (same seed -> same output)
    max_new_tokens  int: most tokens generated per output
    temperature     float: 0 or None = greedy decoding, > 0 = sampling
    top_p           float: nucleus sampling mass (sampling only)
    n               int: outputs per item; when passed, the method returns list[list[str]]
                    (n strings per item) instead of list[str]
    num_inference_steps, guidance_scale, width, height
                    generate (diffusers:): denoising steps, classifier-free guidance scale,
                    output size in pixels; absent = the pipeline's default
A model that declares no params for a task is called with none.
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
