"""n outputs per item folded into the item's one output (worker/outputs.choices): the first is
its text, all n its choices, per-choice finish reasons kept where they differ; a model that
returns something else for an item fails that item alone (worker/inference._choices)."""

from __future__ import annotations

import pytest

from loom.errors import ModelError
from worker.inference import _choices
from worker.outputs import Text, choices


def test_the_first_choice_is_the_text_and_all_are_kept() -> None:
    out = choices(["a red circle", "a circle", "red"])
    assert out == "a red circle" and isinstance(out, Text)
    assert out.details == {"choices": ["a red circle", "a circle", "red"]}


def test_finish_reasons_of_a_remote_model() -> None:
    same = choices([Text("a", {"finish_reason": "stop"}), Text("b", {"finish_reason": "stop"})])
    assert same.details == {"choices": ["a", "b"], "finish_reason": "stop"}
    cut = choices([Text("a", {"finish_reason": "stop"}), Text("b c", {"finish_reason": "length"})])
    assert cut.details["finish_reason"] == "stop"
    assert cut.details["finish_reasons"] == ["stop", "length"]


def test_anything_but_a_list_fails_the_item_naming_it() -> None:
    assert _choices("m", ["x", "y"]) == "x"
    for bad in ("just text", [], None):
        err = _choices("m", bad)
        assert isinstance(err, ModelError) and "asked for n outputs" in err.message
    with pytest.raises(ValueError, match="no choices"):
        choices([])
