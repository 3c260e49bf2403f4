"""What the Task base class gives every task: default data per split, prompt_style checks, is_correct, and
the grounding protocol the demo draws with."""

from __future__ import annotations

import pytest

from gpg_vl import get_task
from gpg_vl.data import DataError
from gpg_vl.images import ImageBudget
from gpg_vl.task import GroundingTask, RewardOutput, Task

BUILT_IN = ("shapes", "cvbench", "geometry", "lisa", "refcoco", "classification")


class Plain(Task):
    name = "plain"
    default_train_data = "hub/train-set"


def test_data_path_picks_the_default_of_the_split():
    task = Plain()
    assert task.data_path("my.jsonl", "test") == "my.jsonl"  # a given path always wins
    assert task.data_path(None, "train") == "hub/train-set"
    assert task.data_path(None, "train[:100]") == "hub/train-set"  # a slice of train is train
    with pytest.raises(DataError, match=r"plain: no default data for split 'test'; pass a local file"):
        task.data_path(None, "test")
    assert [Task.is_train_split(s) for s in ("train", "train[:5]", "test", "validation", "trainer")] == [
        True, True, False, False, False,
    ]


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_task_checks_prompt_style_in_one_place(name):
    assert get_task(name, prompt_style="base").prompt_style == "base"
    with pytest.raises(ValueError, match=rf"{name}: prompt_style must be one of \('instruct', 'base'\), got 'chat'"):
        get_task(name, prompt_style="chat")


@pytest.mark.parametrize("name", ["geometry", "lisa", "refcoco", "classification"])
def test_a_split_without_default_data_says_what_to_pass(name):
    with pytest.raises(DataError, match=rf"{name}: no default data for split 'test'; .*synthetic"):
        get_task(name).load(None, "test")


def test_is_correct_reads_accuracy_or_iou():
    shapes, lisa = get_task("shapes"), get_task("lisa")
    assert shapes.is_correct(RewardOutput(2.0, {"format": 1.0, "accuracy": 1.0}), {}) is True
    assert shapes.is_correct(RewardOutput(1.0, {"format": 1.0, "accuracy": 0.0}), {}) is False
    assert Plain().is_correct(RewardOutput(1.0, {"format": 1.0}), {}) is None  # no accuracy: no verdict
    assert lisa.is_correct(RewardOutput(1.6, {"format": 1.0, "iou": 0.6}), {}) is True
    assert lisa.is_correct(RewardOutput(1.5, {"format": 1.0, "iou": 0.5}), {}) is False  # acc@0.5 is strict


def test_grounding_tasks_follow_the_protocol_and_others_do_not():
    assert [isinstance(get_task(n), GroundingTask) for n in BUILT_IN] == [False, False, False, True, True, False]
    lisa, refcoco = get_task("lisa", prompt_style="base"), get_task("refcoco")
    assert (lisa.box_scale, refcoco.box_scale) == (1000.0, None)
    # base style: the completion continues "<think>", and the box is read from the last <answer>
    completion = "looking</think><answer>(100,200),(1200,400)</answer>"
    assert lisa.parse_box(completion) == (100, 200, 1200, 400)  # as written
    assert lisa.predicted_box(completion, {}) == (100, 200, 1000, 400)  # clipped to the 0-1000 frame
    assert lisa.parse_box("<answer>no box</answer>") is None and lisa.predicted_box("", {}) is None
    example = {"id": "0", "image": None, "width": 224, "height": 224, "box": [0, 0, 10, 10]}
    refcoco.configure_images(ImageBudget(56 * 56, 112 * 112, 28))  # the model saw 112x112: its pixels double
    assert refcoco.predicted_box("<answer>[10, 10, 56, 56]</answer>", example) == (20, 20, 112, 112)
