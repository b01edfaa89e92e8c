"""The task registry: one ``TaskSpec`` per task, the only place a task's rules are written down.

Everything that differs between tasks is derived from here: the API's request schema
(``api/schemas.py``), item validation at submit (API and CLI) and again in the worker
(``worker/inputs.py``), which model method runs a batch and with which arguments
(``worker/inference.py``), how an output is stored (``output`` kind), the CLI commands, and the
export columns (``loom/exports.py``). Adding a task means adding its spec here, its model method
in ``pipeline/``, and a handler only if its output is of a new kind.

Torch-free on purpose: the API and the CLI import it without loading any model code.

    from loom import tasks
    spec = tasks.get("vqa")            # InvalidRequest naming the valid tasks when unknown
    inp = spec.validate_input({"image_url": u, "question": q}, where="items[0]", max_text_chars=500)
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from loom import task_params
from loom.errors import InvalidRequest, LoomError
from loom.task_params import (
    IMAGE_GENERATION,
    PROMPT,
    TEXT_GENERATION,
)

# "model": the job's one output is a registered model version (finetune), not a row per input.
OutputKind = Literal["text", "image", "vector", "model"]
IMAGE_SOURCES = ("image_url", "image_key")
SEED_MAX = task_params.SEED_MAX
Param = task_params.Param


@dataclass(frozen=True)
class TaskSpec:
    name: str
    summary: str
    method: str  # the model method (pipeline.serving.ServingModel) that runs a batch
    image: bool  # takes one image: image_url | image_key (| image_base64 over the API)
    texts: tuple[str, ...] = ()  # required text inputs, in the model method's argument order
    seeded: bool = False  # one seed per item, recorded in lineage; same seed -> same output
    output: OutputKind = "text"
    output_column: str = "text"  # the column holding the output in table exports
    params: tuple[Param, ...] = ()
    cli_name: str = ""  # the CLI command (``loom <cli_name>``); defaults to the task name
    # The worker handler that runs its items (worker/handlers.py): "infer" runs a batch of
    # items in one call of ``method``; any other handler runs each item alone, on the model
    # thread, with nothing else in flight (training).
    handler: str = "infer"

    @property
    def command(self) -> str:
        return self.cli_name or self.name

    @property
    def batched(self) -> bool:
        """Items run in batched model calls: inference tasks, which a model serves (its
        ``info.tasks``), whose batches other jobs' items may fill, with one result per input."""
        return self.handler == "infer"

    @property
    def tabular(self) -> bool:
        """Its results are one row per input, so table views and dataset formats apply."""
        return self.output != "model"

    @property
    def input_fields(self) -> tuple[str, ...]:
        # sha256 (image tasks, optional): the input's expected content hash; the worker fails
        # the item input_mismatch when the bytes it reads hash differently.
        return (*(IMAGE_SOURCES if self.image else ()), *(("sha256",) if self.image else ()),
                *self.texts, *(("seed",) if self.seeded else ()))

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def model_params(self, params: Mapping[str, Any] | None) -> dict[str, Any]:
        """The job params that go to the model method, under the method's keywords (``prompts``
        for ``prompt``, ``seeds`` for a sampling ``seed``: the worker expands those per item)."""
        return {p.keyword: v for k, v in (params or {}).items()
                if (p := self.param(k)) and p.model}

    # --- validation (API, CLI and worker alike) -----------------------------------------------

    def validate_params(self, params: Mapping[str, Any] | None, *, where: str = "params",
                        item_count: int = 0) -> dict[str, Any]:
        """Known params with valid values; anything else is an InvalidRequest naming it."""
        out: dict[str, Any] = {}
        for name, value in (params or {}).items():
            p = self.param(name)
            if p is None:
                valid = ", ".join(x.name for x in self.params) or "none"
                raise InvalidRequest(
                    f"{where}.{name}: task {self.name!r} takes no parameter {name!r} "
                    f"(valid: {valid})")
            out[name] = p.check(value, f"{where}.{name}")
        if self.seeded and "seed" in out and out["seed"] + max(item_count - 1, 0) > SEED_MAX:
            raise InvalidRequest(
                f"{where}.seed: {out['seed']} + {item_count} items passes the largest seed "
                f"{SEED_MAX}")
        return out

    def validate_input(self, inp: Mapping[str, Any], *, where: str, max_text_chars: int,
                       error: type[LoomError] = InvalidRequest) -> dict[str, Any]:
        """The item's input dict, checked: one image source when the task takes an image, every
        required text non-empty and within the limit, a seed in range. ``error``: InvalidRequest
        at submit, InvalidInput in the worker (the item fails, not the request)."""
        out: dict[str, Any] = {}
        extra = sorted(k for k, v in inp.items() if v is not None and k not in self.input_fields)
        if extra:
            raise error(f"{where}: task {self.name!r} takes no {extra[0]!r} "
                        f"(it takes {', '.join(self.input_fields)})")
        if self.image:
            sources = [k for k in IMAGE_SOURCES if inp.get(k)]
            if len(sources) != 1:
                raise error(f"{where}: task {self.name!r} needs an image: give exactly one of "
                            f"image_url, image_key, image_base64 (got {len(sources)})")
            value = inp[sources[0]]
            if not isinstance(value, str) or len(value) > 2048:
                raise error(f"{where}.{sources[0]}: expected a string of at most 2048 characters")
            out[sources[0]] = value
            digest = inp.get("sha256")
            if digest is not None:
                if not (isinstance(digest, str) and len(digest) == 64
                        and all(c in "0123456789abcdefABCDEF" for c in digest)):
                    raise error(f"{where}.sha256: expected 64 hex digits")
                out["sha256"] = digest.lower()
        for name in self.texts:
            value = inp.get(name)
            if not isinstance(value, str) or not value.strip():
                raise error(f"{where}.{name}: required for task {self.name!r}")
            if len(value) > max_text_chars:
                raise error(f"{where}.{name} is {len(value)} characters; "
                            f"the limit is {max_text_chars}")
            out[name] = value
        if self.seeded and inp.get("seed") is not None:
            out["seed"] = check_seed(inp["seed"], f"{where}.seed", error=error)
        return out


def check_seed(value: Any, where: str, *, error: type[LoomError] = InvalidRequest) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SEED_MAX:
        raise error(f"{where}: expected an integer from 0 to {SEED_MAX}, got {value!r:.60}")
    return value


# --- the seed policy (one place) -------------------------------------------------------------


def item_seed(*, given: int | None, base: int | None, index: int) -> int:
    """The seed item ``index`` runs with: its own, else the job's base seed + index, else a
    random one (recorded, so the output can still be reproduced)."""
    if given is not None:
        return given
    if base is not None:
        return base + index
    return random.SystemRandom().randrange(2**31)


def derive_seed(job_id: str, index: int) -> int:
    """A stable seed for an item that reached a worker without one (older rows)."""
    digest = hashlib.sha256(f"{job_id}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (SEED_MAX + 1)


def json_safe(value: Any, where: str) -> None:
    """Refuse what JSON columns cannot hold faithfully: NaN/Infinity and lone surrogates."""
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidRequest(f"{where}: {value} is not a JSON number")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequest(f"{where}: not valid UTF-8 text (a lone surrogate)") from None
    elif isinstance(value, Mapping):
        for k, v in value.items():
            json_safe(k, where)
            json_safe(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            json_safe(v, f"{where}[{i}]")


# --- the registry ----------------------------------------------------------------------------

REGISTRY: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("caption", "describe each image in one sentence", method="caption",
                 image=True, output_column="caption", params=(PROMPT, *TEXT_GENERATION)),
        TaskSpec("vqa", "answer a question about each image", method="answer", image=True,
                 texts=("question",), output_column="answer", params=TEXT_GENERATION,
                 cli_name="ask"),
        TaskSpec("generate", "draw an image for each prompt", method="generate", image=False,
                 texts=("prompt",), seeded=True, output="image", output_column="file",
                 params=IMAGE_GENERATION),
        TaskSpec("embed", "embed each image as a fixed-size vector (dedupe, search)",
                 method="embed", image=True, output="vector", output_column="vector"),
        # One item: a rows manifest, a base model and hyperparameters (loom/finetune.py checks
        # them); its output is the registered model version. Submitted by /v1/finetunes and
        # ``loom finetune``, run by worker/handlers.py's finetune handler.
        TaskSpec("finetune", "fine-tune a model on labelled rows into a new model version",
                 method="", image=False, output="model", output_column="model",
                 handler="finetune"),
    )
}


def uses_row_fields(params: Mapping[str, Any] | None) -> bool:
    """Whether a job's prompt template has ``{column}`` fields (filled from each item's row)."""
    prompt = (params or {}).get("prompt")
    return isinstance(prompt, str) and bool(task_params.template_fields(prompt))


def inference() -> list[TaskSpec]:
    """The tasks models serve (batched): what /v1/jobs takes and the CLI has a command for."""
    return [s for s in REGISTRY.values() if s.batched]


def names() -> list[str]:
    """The names of the inference tasks (``inference``)."""
    return [s.name for s in inference()]


def get(name: str) -> TaskSpec:
    spec = REGISTRY.get(name)
    if spec is None:
        raise InvalidRequest(f"task: unknown task {name!r}; valid tasks: {', '.join(REGISTRY)}")
    return spec


def by_command(command: str) -> TaskSpec:
    return next(s for s in inference() if s.command == command)


# --- models the control plane knows without loading them ------------------------------------


@dataclass(frozen=True)
class ModelCaps:
    """What a model serves: its tasks and, per task, the model params it accepts. The worker
    checks the same against the loaded model's ``info`` (pipeline.serving)."""

    tasks: tuple[str, ...]
    params: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


# The built-in models (pipeline/registry.py is the truth; a test keeps the two equal).
BUILTIN_MODELS: dict[str, ModelCaps] = {
    "loom-shapes": ModelCaps(tasks=("caption", "vqa", "generate", "embed"),
                             params={"caption": ("beams",), "vqa": ("beams",)}),
}
# Models named by where they are: what each kind of backend may serve. The model itself is read
# where it runs (a folder on the worker's disk, a server the worker reaches), so the control
# plane knows only the kind's bounds; the worker checks the loaded model's own declaration
# (pipeline/serving.py) and fails what it cannot do as unsupported_task / unsupported_param,
# and the embedded CLI, on the model's own machine, checks it before recording a job.
_CHAT = ("prompts", "max_new_tokens", "temperature", "top_p", "seeds", "n")
HF_PREFIX = "hf:"
HF_CAPS = ModelCaps(tasks=("caption", "vqa", "embed"),
                    params={"caption": _CHAT, "vqa": _CHAT[1:]})
DIFFUSERS_PREFIX = "diffusers:"
DIFFUSERS_CAPS = ModelCaps(tasks=("generate",), params={
    "generate": ("num_inference_steps", "guidance_scale", "width", "height")})
OPENAI_PREFIX = "openai:"
OPENAI_CAPS = ModelCaps(tasks=("caption", "vqa", "embed", "generate"), params={
    "caption": (*_CHAT, "response_format"), "vqa": (*_CHAT[1:], "response_format"),
    "generate": ("width", "height")})
BACKEND_PREFIXES: dict[str, ModelCaps] = {
    HF_PREFIX: HF_CAPS, DIFFUSERS_PREFIX: DIFFUSERS_CAPS, OPENAI_PREFIX: OPENAI_CAPS}


def backend_of(model: str) -> str | None:
    """The backend prefix a model name starts with (``hf:``, ``diffusers:``, ``openai:``)."""
    return next((p for p in BACKEND_PREFIXES if model.startswith(p) and len(model) > len(p)),
                None)


def check_model(spec: TaskSpec, model: str, caps: ModelCaps | None,
                params: Mapping[str, Any]) -> None:
    """Refuse, before anything is recorded, a model that does not serve the task or a model
    param the model does not take (a permanent error, never a retried model failure)."""
    if caps is None:
        raise InvalidRequest(f"model: unknown model {model!r}; see GET /v1/models or loom models")
    if spec.name not in caps.tasks:
        raise InvalidRequest(f"model: {model!r} does not serve task {spec.name!r} "
                             f"(it serves {', '.join(caps.tasks)})")
    accepted = set(caps.params.get(spec.name, ()))
    takes = sorted(p.name for p in spec.params if p.model and p.keyword in accepted)
    for name in params:
        p = spec.param(name)
        if p is not None and p.model and p.keyword not in accepted:
            what = "a free prompt" if name == "prompt" else repr(name)
            raise InvalidRequest(
                f"params.{name}: model {model!r} does not take {what} for task "
                f"{spec.name!r} (it takes {', '.join(takes) or 'no parameters'})")


def caps_for(model: str, recorded: Mapping[str, ModelCaps] | None = None) -> ModelCaps | None:
    """Capabilities of ``model``: built in, a backend reference (``hf:``, ``diffusers:``,
    ``openai:``), or recorded by a worker."""
    if model in BUILTIN_MODELS:
        return BUILTIN_MODELS[model]
    prefix = backend_of(model)
    if prefix is not None:
        return BACKEND_PREFIXES[prefix]
    return (recorded or {}).get(model)


__all__ = [
    "BACKEND_PREFIXES", "BUILTIN_MODELS", "DIFFUSERS_CAPS", "HF_CAPS", "OPENAI_CAPS", "REGISTRY",
    "SEED_MAX", "ModelCaps", "Param", "TaskSpec", "backend_of", "by_command", "caps_for", "check_model", "check_seed", "derive_seed", "get",
    "inference", "item_seed", "json_safe", "names",
]
