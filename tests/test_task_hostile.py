"""Hostile completions: every built-in task scores them in time linear in their length, and never raises.

A size sweep catches quadratic parsing without trusting wall-clock figures on a shared machine: scoring a
text 8x longer must take well under 64x as long (linear is 8x). The best of three runs hides most noise;
a quadratic parser fails at the small size already (the old parsers took 3 s on 50 KB, 200 s on 400 KB).
"""

from __future__ import annotations

import time

import pytest

from gpg_vl import get_task

TASKS = ("shapes", "cvbench", "geometry", "lisa", "refcoco", "classification")
SMALL, LARGE = 50_000, 400_000  # characters
MAX_RATIO = 24.0  # linear growth gives ~8, quadratic ~64
MAX_SMALL_S = 1.0  # a linear parser needs milliseconds for 50 KB; the old ones took seconds


def _hostile(kind: str, n: int) -> str:
    """A completion of about n characters of one hostile shape."""
    good = "<think>x</think><answer>(A)</answer>"
    return {
        "repeated_answer": "<answer>" * (n // 8),
        "unclosed_tags": "<think>" * (n // 14) + "<answer>" * (n // 16),
        "think_then_open_answers": "<think>x</think>" + "<answer>a" * (n // 9),
        "good_answer_then_junk": good + "</think><answer>" * (n // 16),
        "digit_run": "<think>x</think><answer>(" + "9" * n + "</answer>",
        "digit_list": "<think>x</think><answer>[" + "9" * n + ", 1, 2, 3]</answer>",
        "bracket_run": "<think>x</think><answer>" + "[" * n + "</answer>",
        "paren_run": "(" * n,
        "point_pairs": "(1," * (n // 3),
        "spaces_in_box": "<answer>[ " + " " * n + "1",
        "letters": "<answer>" + "A " * (n // 2) + "</answer>",
    }[kind]


SHAPES = (
    "repeated_answer", "unclosed_tags", "think_then_open_answers", "good_answer_then_junk", "digit_run",
    "digit_list", "bracket_run", "paren_run", "point_pairs", "spaces_in_box", "letters",
)


@pytest.fixture(scope="module", params=TASKS)
def task_and_example(request):
    task = get_task(request.param)
    example = task.load("synthetic:1", "test")[0]
    task.score(_hostile("think_then_open_answers", 100), example)  # starts geometry's grader outside the timing
    return task, example


def _best_time(task, example, text: str, runs: int = 3) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        task.score(text, example)
        task.parse_answer(text)
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.parametrize("kind", SHAPES)
def test_hostile_completion_scores_in_linear_time(task_and_example, kind):
    task, example = task_and_example
    small = _best_time(task, example, _hostile(kind, SMALL))
    assert small < MAX_SMALL_S, f"{task.name}: {kind} of {SMALL} chars took {small:.2f} s"
    large = _best_time(task, example, _hostile(kind, LARGE))
    # a floor of 1 ms keeps timer resolution from inflating the ratio of two tiny times
    ratio = large / max(small, 1e-3)
    assert ratio < MAX_RATIO, f"{task.name}: {kind} took {small:.4f} s at {SMALL} chars, {large:.4f} s at {LARGE}"


def test_good_answer_followed_by_junk_keeps_its_format_zero_and_no_answer_is_lost():
    task = get_task("shapes")
    example = task.load("synthetic:1", "test")[0]
    truth = example["answer"]
    text = f"<think>x</think><answer>{truth}</answer>" + "</think><answer>" * 10_000
    reward = task.score(text, example)
    # junk after the answer breaks the format; the last closed <answer> block is still the right letter
    assert reward.components == {"format": 0.0, "accuracy": 1.0}
