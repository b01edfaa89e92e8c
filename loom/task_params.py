"""Job parameters: what a task accepts besides its items, checked at submit (API and CLI) and
passed on to the model method where they are model parameters (``loom/tasks.py`` lists which
task takes which).

A model parameter has the name the job uses and the keyword the model method takes
(``kwarg``, pipeline/serving.py): most are passed as they are (``max_new_tokens``); a
``per_item`` one becomes one value per item in the worker: ``prompt`` (a template whose
``{column}`` fields are filled from each item's metadata, the dataset row's columns) is passed as
``prompts``, and ``seed`` (the base seed: item i samples with seed + i) as ``seeds``.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from loom.errors import InvalidInput, InvalidRequest

# Seeds are JSON-safe integers (a JavaScript client must not round them) and fit torch's
# generator; a job's base seed plus its item count must stay inside the same range.
SEED_MAX = 2**53 - 1
PROMPT_MAX_CHARS = 4000


@dataclass(frozen=True)
class Param:
    """A job parameter a task accepts. ``model`` params are passed to the model method as
    ``kwarg`` (and so must be accepted by the model, checked at submit); the others are read by
    Loom itself. ``per_item``: the worker passes one value per item (see the module doc)."""

    name: str
    kind: type = int
    minimum: float | None = None
    maximum: float | None = None
    model: bool = True
    help: str = ""
    kwarg: str = ""
    per_item: bool = False

    @property
    def keyword(self) -> str:
        return self.kwarg or self.name

    def check(self, value: Any, where: str) -> Any:
        if self.kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidRequest(f"{where}: expected an integer, got {value!r:.60}")
        elif self.kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidRequest(f"{where}: expected a number, got {value!r:.60}")
            value = float(value)
        elif self.kind is str:
            if not isinstance(value, str) or not value.strip():
                raise InvalidRequest(f"{where}: expected a non-empty string, got {value!r:.60}")
            if len(value) > PROMPT_MAX_CHARS:
                raise InvalidRequest(f"{where} is {len(value)} characters; the limit is "
                                     f"{PROMPT_MAX_CHARS}")
            template_fields(value, where)
        elif not isinstance(value, self.kind):
            raise InvalidRequest(f"{where}: expected {self.kind.__name__}, got {value!r:.60}")
        if self.minimum is not None and value < self.minimum:
            raise InvalidRequest(f"{where}: must be >= {self.minimum:g}, got {value}")
        if self.maximum is not None and value > self.maximum:
            raise InvalidRequest(f"{where}: must be <= {self.maximum:g}, got {value}")
        return value


def template_fields(template: str, where: str = "params.prompt") -> list[str]:
    """The ``{column}`` fields of a prompt template; a malformed one is an InvalidRequest.
    Literal braces are written doubled (``{{`` and ``}}``)."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise InvalidRequest(f"{where}: not a valid template ({exc}); write a literal brace as "
                             "{{ or }}") from None
    fields = []
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if not field.strip() or any(c in field for c in ".[]"):
            # format_map would index or read attributes: only plain column names are allowed
            raise InvalidRequest(f"{where}: {{{field}}} is not a column name")
        if spec or conversion:
            raise InvalidRequest(f"{where}: {{{field}}}: only plain {{column}} fields are "
                                 "allowed, without format specs or conversions")
        fields.append(field)
    return fields


def fill_prompt(template: str, metadata: Mapping[str, Any] | None) -> str:
    """The template with each ``{column}`` replaced by the item's value of that column; a
    column the item does not have (or has empty) fails the item, naming it."""
    meta = metadata or {}
    values: dict[str, str] = {}
    for name in template_fields(template):
        value = meta.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            known = ", ".join(sorted(map(str, meta))) or "none"
            raise InvalidInput(f"prompt template: this row has no value for {{{name}}} "
                               f"(its columns: {known})")
        values[name] = str(value)
    return template.format_map(values)


BEAMS = Param("beams", minimum=1, maximum=8, help="beam width of text decoding (1 = greedy)")
SEED = Param("seed", minimum=0, maximum=SEED_MAX, model=False,
             help="base seed: item i uses seed + i unless it has its own")
PROMPT = Param("prompt", kind=str, kwarg="prompts", per_item=True,
               help="the instruction; {column} fields are filled from each row")
MAX_NEW_TOKENS = Param("max_new_tokens", minimum=1, maximum=8192,
                       help="the most tokens to generate")
TEMPERATURE = Param("temperature", kind=float, minimum=0.0, maximum=2.0,
                    help="sampling temperature (0: greedy)")
TOP_P = Param("top_p", kind=float, minimum=0.0, maximum=1.0, help="nucleus sampling")
SAMPLE_SEED = Param("seed", minimum=0, maximum=SEED_MAX, kwarg="seeds", per_item=True,
                    help="base seed of sampling: item i samples with seed + i")
# n outputs per item: one model call returns n texts for the item (n samples when sampling, the n
# best beams when greedy). They stay one item with one output row: its text is the first, and
# the output's details keep all n as ``choices`` (the results' ``choices`` column).
N_OUTPUTS = Param("n", minimum=1, maximum=16,
                  help="outputs per item: the first is the item's text, all n its choices")
RESPONSE_FORMAT = Param("response_format", kind=dict,
                        help="a JSON schema the reply must validate against (openai: models)")
STEPS = Param("num_inference_steps", minimum=1, maximum=500, help="denoising steps")
GUIDANCE = Param("guidance_scale", kind=float, minimum=0.0, maximum=50.0,
                 help="classifier-free guidance")
WIDTH = Param("width", minimum=64, maximum=4096, help="image width in pixels")
HEIGHT = Param("height", minimum=64, maximum=4096, help="image height in pixels")

TEXT_GENERATION = (BEAMS, MAX_NEW_TOKENS, TEMPERATURE, TOP_P, SAMPLE_SEED, N_OUTPUTS,
                   RESPONSE_FORMAT)
IMAGE_GENERATION = (SEED, STEPS, GUIDANCE, WIDTH, HEIGHT)
