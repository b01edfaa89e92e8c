"""Errors raised by the model package (the worker maps them to item error codes)."""
from __future__ import annotations


class PipelineError(Exception):
    """Base of every error raised on purpose by pipeline/."""


class UnknownModelError(PipelineError, KeyError):
    def __init__(self, name: str, known: list[str]):
        self.name, self.known = name, known
        super().__init__(f"unknown model {name!r}; known models: {', '.join(known) or '(none)'}"
                         " (or 'hf:<local dir or hub id>')")

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0])


class WeightsMismatchError(PipelineError):
    def __init__(self, path: str, expected: str, got: str):
        self.path, self.expected, self.got = path, expected, got
        super().__init__(f"weights file {path} does not match the registry: "
                         f"expected sha256 {expected}, got {got}; refusing to load a changed checkpoint")


class WeightsMissingError(PipelineError, FileNotFoundError):
    pass


class UnsupportedTaskError(PipelineError):
    """The model cannot do the requested task (e.g. generate on an image-to-text model)."""


class UnsupportedParamError(PipelineError):
    """A parameter the model does not accept for the task (a permanent error of the request)."""
