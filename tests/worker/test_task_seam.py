"""The registry meets the models: what loom/tasks.py promises at submit is what the pipeline's
models declare (pipeline/serving.py), and a call a model cannot take fails permanently."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from fixtures_worker import require_model
from loom import tasks
from loom.jobs import ClaimedItem


def test_builtin_capabilities_match_the_pipeline_registry() -> None:
    from pipeline import registry
    from pipeline.model import PARAMS

    for entry in registry.list_models():
        caps = tasks.BUILTIN_MODELS[entry.name]
        assert set(caps.tasks) == set(entry.tasks)
        for task in caps.tasks:
            assert set(caps.params.get(task, ())) == set(PARAMS.get(task, ())), task
            assert tasks.get(task).method  # every served task has a spec with a method
    from loom.jobs.registry import FINETUNED_TASKS

    assert FINETUNED_TASKS == registry.FINETUNED_TASKS  # what a fine-tuned version serves


def _item(task: str, params: dict[str, Any], inp: dict[str, Any]) -> ClaimedItem:
    return ClaimedItem(id=1, job_id="j", tenant_id="t", index=0, task=task,
                       model_name="loom-shapes", params=params, input=inp, attempts=1)


def test_unsupported_param_is_permanent_not_a_retried_model_error() -> None:
    require_model()
    from pipeline import registry, serving
    from PIL import Image

    from loom.config import Settings
    from worker.inference import ModelCache, infer
    from worker.inputs import Prepared

    model = registry.load("loom-shapes", device="cpu")
    assert isinstance(model, serving.ServingModel)
    # The same real model, declaring that it takes no parameters for caption.
    narrow = dataclasses.replace(model.info, params={"caption": ()})
    model.info = narrow
    cache = ModelCache(Settings(), session_factory=None,  # type: ignore[arg-type]
                       model_loader=lambda name: model)
    cache._recorded_versions.add((narrow.name, narrow.version, narrow.weights_sha256))
    prep = Prepared(item=_item("caption", {"beams": 2}, {"image_key": "t/a.png"}),
                    image=Image.new("RGB", (64, 64), "white"))
    outs, failed, _, _ = infer(cache, [prep])
    assert outs == [] and failed == [prep]
    assert prep.error is not None and prep.error.code == "unsupported_task"
    assert not prep.error.transient and "does not take 'beams'" in prep.error.message

    model.info = dataclasses.replace(narrow, params={"caption": ("beams",)})
    prep = Prepared(item=_item("caption", {"beams": 2}, {"image_key": "t/a.png"}),
                    image=Image.new("RGB", (64, 64), "white"))
    outs, failed, _, _ = infer(cache, [prep])
    assert failed == [] and isinstance(outs[0][1], str)


@pytest.mark.parametrize("task", tasks.BUILTIN_MODELS["loom-shapes"].tasks)
def test_every_served_task_has_its_model_method(task: str) -> None:
    from pipeline.model import ShapesModel

    assert callable(getattr(ShapesModel, tasks.get(task).method))
