"""The built-in synthetic task: deterministic, verifiable answers, rewards on every kind of completion."""

import time

import pytest

from gpg_vl import get_task
from gpg_vl_tasks.shapes import COLORS, LETTERS


@pytest.fixture(scope="module")
def task():
    return get_task("shapes", questions=["color", "shape"])


def test_deterministic_by_split_and_splits_differ(task):
    a, b = task.load("synthetic:20", "train"), task.load("synthetic:20", "train")
    assert [e["answer"] for e in a] == [e["answer"] for e in b]
    assert [e["image"].tobytes() for e in a] == [e["image"].tobytes() for e in b]
    test = task.load("synthetic:20", "test")
    assert [e["image"].tobytes() for e in a] != [e["image"].tobytes() for e in test]


def test_colour_answers_are_verifiable_from_the_pixels():
    task = get_task("shapes", questions=["color"])
    for example in task.load("synthetic:30", "train"):
        truth = example["choices"][LETTERS.index(example["answer"][1])]
        pixels = set(example["image"].getdata())
        assert COLORS[truth] in pixels  # the drawn shape has the answer's colour
        assert not any(COLORS[c] in pixels for c in COLORS if c != truth)


def test_rendered_prompt_golden(task):
    example = task.load("synthetic:1", "train")[0]
    messages = task.messages(example)
    assert messages[0]["content"][0]["type"] == "image"
    text = messages[0]["content"][1]["text"]
    assert text == (
        f"{example['question']}\n"
        + "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(example["choices"]))
        + "\nOutput the thinking process in <think> </think> and final answer in <answer> </answer> tags."
    )
    base = get_task("shapes", prompt_style="base").messages(example)
    assert [m["role"] for m in base] == ["system", "user", "assistant"] and base[-1]["content"] == "<think>"


def test_rewards_on_correct_wrong_malformed_empty_adversarial(task):
    example = {"choices": ["red", "green", "blue", "yellow"], "answer": "(C)", "category": "color"}
    cases = {
        "<think>it is blue</think><answer>(C)</answer>": (1, 1),
        "<think>x</think> <answer>blue</answer>": (1, 1),
        "<think>x</think><answer>C</answer>": (1, 1),
        "<think>x</think><answer>(A)</answer>": (1, 0),
        "<think>x</think><answer>(A) or (C)</answer>": (1, 0),  # hedging names no single choice
        "<answer>(C)</answer>": (0, 1),
        "<think><think>x</think></think><answer>(C)</answer>": (0, 1),
        "": (0, 0),
        "<think>" + "é" * 100_000 + "</think><answer>🙂</answer>": (1, 0),
    }
    for completion, (fmt, acc) in cases.items():
        out = task.score(completion, example)
        assert out.components == {"format": fmt, "accuracy": acc}, completion[:60]
        assert out.total == fmt + acc


def test_base_style_scores_the_continuation():
    task = get_task("shapes", prompt_style="base")
    example = {"choices": ["red", "green", "blue", "yellow"], "answer": "(B)", "category": "color"}
    assert task.score("green it is</think><answer>(B)</answer>", example).total == 2.0


def test_metrics_hand_computed(task):
    examples = [
        {"choices": ["red", "green"], "answer": "(A)", "category": "color"},
        {"choices": ["red", "green"], "answer": "(B)", "category": "color"},
        {"choices": ["circle", "square"], "answer": "(A)", "category": "shape"},
        {"choices": ["circle", "square"], "answer": "(B)", "category": "shape"},
    ]
    completions = ["<think>x</think><answer>(A)</answer>", "<answer>(A)</answer>", "garbage", "<think>y</think><answer>square</answer>"]
    m = task.metrics(examples, completions)
    # right: 1st and 4th -> 2/4; format ok: 1st and 4th -> 2/4; colour 1/2, shape 1/2
    assert m == {"accuracy": 0.5, "format": 0.5, "accuracy/color": 0.5, "accuracy/shape": 0.5}


def test_scoring_is_fast(task):
    example = {"choices": ["red", "green", "blue", "yellow"], "answer": "(C)", "category": "color"}
    start = time.perf_counter()
    for i in range(1000):
        task.score(f"<think>{i}</think><answer>({'ABCD'[i % 4]})</answer>", example)
    assert time.perf_counter() - start < 2.0


def test_bad_options_and_data_fail():
    with pytest.raises(ValueError, match="questions"):
        get_task("shapes", questions=["size"])
    from gpg_vl.data import DataError

    with pytest.raises(DataError, match="synthetic only"):
        get_task("shapes").load("some/hub-id")
