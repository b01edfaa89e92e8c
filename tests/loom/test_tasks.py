"""The task registry: every rule a task has, and the refusals at submit that name the fix."""

from __future__ import annotations

import pytest

from loom import tasks
from loom.errors import InvalidInput, InvalidRequest


def test_unknown_task_lists_the_valid_ones() -> None:
    with pytest.raises(InvalidRequest) as e:
        tasks.get("paint")
    assert "'paint'" in e.value.message
    for name in tasks.names():
        assert name in e.value.message


@pytest.mark.parametrize(("task", "inp", "needle"), [
    ("caption", {}, "exactly one of image_url, image_key, image_base64 (got 0)"),
    ("caption", {"image_url": "https://e/a", "image_key": "t/a"}, "(got 2)"),
    ("caption", {"image_url": "https://e/a", "prompt": "x"}, "takes no 'prompt'"),
    ("vqa", {"image_url": "https://e/a"}, "items[3].question: required"),
    ("vqa", {"image_url": "https://e/a", "question": " "}, "items[3].question: required"),
    ("vqa", {"image_url": "https://e/a", "question": "q" * 11}, "11 characters; the limit is 10"),
    ("generate", {"prompt": "a", "seed": -1}, "items[3].seed"),
    ("generate", {"prompt": "a", "seed": tasks.SEED_MAX + 1}, "items[3].seed"),
    ("generate", {"prompt": "a", "seed": True}, "items[3].seed"),
    ("generate", {"prompt": "a", "image_url": "https://e/a"}, "takes no 'image_url'"),
])
def test_item_validation_names_the_field(task: str, inp: dict, needle: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        tasks.get(task).validate_input(inp, where="items[3]", max_text_chars=10)
    assert needle in e.value.message


def test_the_worker_gets_the_same_rules_as_an_item_error() -> None:
    spec = tasks.get("vqa")
    assert spec.validate_input({"image_key": "t/a.png", "question": "is it red?"},
                               where="input", max_text_chars=50) == \
        {"image_key": "t/a.png", "question": "is it red?"}
    with pytest.raises(InvalidInput):  # the item fails, not the request
        spec.validate_input({"image_key": "t/a.png"}, where="input", max_text_chars=50,
                            error=InvalidInput)


@pytest.mark.parametrize(("task", "params", "count", "needle"), [
    ("caption", {"nucleus": 0.5}, 1, "params.nucleus: task 'caption' takes no"),
    ("caption", {"temperature": 3.0}, 1, "params.temperature: must be <= 2"),
    ("caption", {"prompt": "Describe the {a.b}"}, 1, "{a.b} is not a column name"),
    ("embed", {"prompt": "Describe"}, 1, "task 'embed' takes no parameter 'prompt'"),
    ("caption", {"beams": 0}, 1, "params.beams: must be >= 1"),
    ("caption", {"beams": 2.5}, 1, "params.beams: expected an integer"),
    ("generate", {"seed": 10**30}, 1, "params.seed: must be <="),
    ("generate", {"seed": tasks.SEED_MAX - 1}, 5, "passes the largest seed"),
    ("generate", {"beams": 2}, 1, "(valid: seed, num_inference_steps"),
])
def test_params_are_checked_against_the_task(task: str, params: dict, count: int,
                                             needle: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        tasks.get(task).validate_params(params, item_count=count)
    assert needle in e.value.message


def test_model_params_are_only_those_the_model_receives() -> None:
    assert tasks.get("caption").model_params({"beams": 3}) == {"beams": 3}
    assert tasks.get("generate").model_params({"seed": 3}) == {}  # read by Loom, not the model


def test_models_are_checked_before_anything_is_recorded() -> None:
    caption, generate = tasks.get("caption"), tasks.get("generate")
    tasks.check_model(caption, "loom-shapes", tasks.caps_for("loom-shapes"), {"beams": 3})
    with pytest.raises(InvalidRequest, match="unknown model 'nope'"):
        tasks.check_model(caption, "nope", tasks.caps_for("nope"), {})
    with pytest.raises(InvalidRequest, match="does not serve task 'generate'"):
        tasks.check_model(generate, "hf:some/model", tasks.caps_for("hf:some/model"), {})
    # The bug this registry fixed: beams on an hf: model was a retried model_error per item.
    with pytest.raises(InvalidRequest, match="params.beams: model 'hf:x' does not take"):
        tasks.check_model(caption, "hf:x", tasks.caps_for("hf:x"), {"beams": 3})
    recorded = {"tuned": tasks.ModelCaps(tasks=("caption",))}
    tasks.check_model(caption, "tuned", tasks.caps_for("tuned", recorded), {})


def test_seed_policy() -> None:
    assert tasks.item_seed(given=7, base=100, index=3) == 7
    assert tasks.item_seed(given=None, base=100, index=3) == 103
    assert 0 <= tasks.item_seed(given=None, base=None, index=3) < 2**31
    assert tasks.derive_seed("job", 1) == tasks.derive_seed("job", 1) != tasks.derive_seed("job", 2)
    assert 0 <= tasks.derive_seed("job", 1) <= tasks.SEED_MAX


@pytest.mark.parametrize("value", [float("nan"), float("inf"), {"a": [1, float("-inf")]},
                                   "\ud800", {"k\udfff": 1}])
def test_json_safety(value: object) -> None:
    with pytest.raises(InvalidRequest, match="metadata"):
        tasks.json_safe(value, "metadata")
    tasks.json_safe({"ok": [1, 2.5, "text", None, True]}, "metadata")
