"""The `loom` entry point starts the engines' forkserver only for commands that run a model."""

from __future__ import annotations

import pytest

from worker.entry import runs_engines


@pytest.mark.parametrize("argv", [
    ["loom", "caption", "images/"],
    ["loom", "ask", "a.png", "what colour?"],
    ["loom", "generate", "--prompts", "p.txt"],
    ["loom", "embed", "images/"],
    ["loom", "run", "abc123"],
])
def test_commands_that_run_a_model_here_start_the_engines(argv: list[str]) -> None:
    assert runs_engines(argv)


@pytest.mark.parametrize("argv", [
    ["loom"],
    ["loom", "status"],
    ["loom", "results", "abc123"],
    ["loom", "worker"],
    ["loom", "caption", "--help"],
    ["loom", "generate", "-h"],
])
def test_other_commands_and_help_do_not(argv: list[str]) -> None:
    assert not runs_engines(argv)
