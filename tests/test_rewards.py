"""The reward library and configured rewards: every library reward on a right, a wrong, a malformed, an empty
and a 1 MB completion; gold answers it cannot use fail at once; weights, names and user functions
(`file.py:function`, `pkg.module:function`) are checked and their bad returns name the function."""

from __future__ import annotations

import math
import time

import pytest

from gpg_vl.config import ConfigError
from gpg_vl.rewards import (
    LIBRARY,
    RewardError,
    Target,
    accuracy_component,
    build_rewards,
    combine,
    options_in,
    score_batch,
)

QUESTION = "What shape is in the image?\n(A) circle\n(B) square\n(C) triangle\n(D) diamond"
MB = 1 << 20


def wrap(answer: str) -> str:
    return f"<think>looking</think><answer>{answer}</answer>"


def grade(name: str, completion: str, target: Target) -> float:
    reward = LIBRARY[name]
    return reward.grade(completion, reward.gold(target))


# name, target, right, wrong, malformed, the value of a right answer (1 unless noted)
CASES = [
    ("format", Target("x"), wrap("x"), "<answer>x</answer>", "<think>a</think><answer>b</answer><answer>", 1.0),
    ("choice", Target("(B)", QUESTION), wrap("(B)"), wrap("(C)"), "<think>a</think><answer>(B)", 1.0),
    ("math", Target("<answer> 0.5 </answer>"), wrap("0.50"), wrap("0.3"), wrap("\\frac{1}{"), 1.0),
    ("iou", Target([10, 10, 50, 50]), wrap("[10, 10, 50, 50]"), wrap("[60, 60, 90, 90]"), wrap("[10, 10, 50]"), 1.0),
    # GIoU + 1: a perfect box scores 2
    ("giou", Target("[10, 10, 50, 50]"), wrap("(10,10),(50,50)"), wrap("[50, 50, 10, 10]"), wrap("[10, 10, 50"), 2.0),
    ("exact", Target("Pink Primrose"), wrap("pink_primrose."), wrap("primrose"), "pink primrose", 1.0),
    ("contains", Target("pink primrose"), wrap("It is a Pink  Primrose."), wrap("a primrose"), "<answer>pink primrose", 1.0),
]
IDS = [c[0] for c in CASES]


def hostile(kind: str) -> str:
    """About 1 MB of text of one hostile shape."""
    return {
        "long_answer": wrap("A " * (MB // 2)),
        "open_tags": "<answer>" * (MB // 8),
        "digits": wrap("[" + "9" * MB + ", 1, 2, 3]"),
        "brackets": wrap("(" * MB),
        "long_think": "<think>" + "x" * MB + "</think><answer>(B)</answer>",
    }[kind]


def test_the_library_is_the_documented_set():
    assert list(LIBRARY) == ["format", "choice", "math", "iou", "giou", "exact", "contains"]
    assert [n for n, r in LIBRARY.items() if r.correctness] == ["choice", "math", "exact", "contains"]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_right_wrong_malformed_and_empty(case):
    name, target, right, wrong, malformed, best = case
    assert grade(name, right, target) == best
    assert grade(name, wrong, target) == 0.0
    assert grade(name, malformed, target) == 0.0
    assert grade(name, "", target) == 0.0


@pytest.mark.parametrize("kind", ["long_answer", "open_tags", "digits", "brackets", "long_think"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_a_megabyte_completion_is_scored_quickly_and_never_raises(case, kind):
    name, target = case[0], case[1]
    start = time.perf_counter()
    value = grade(name, hostile(kind), target)
    # A linear parser needs well under a second for 1 MB even on a loaded machine; a quadratic one needs
    # minutes, so this bound catches it without being a benchmark.
    assert time.perf_counter() - start < 20.0
    assert math.isfinite(value) and 0.0 <= value <= 2.0
    if kind != "long_think":  # the long thought still ends in a good "(B)" answer
        assert value == 0.0 or name == "format"


def test_math_asks_math_verify_for_non_numbers():
    target = Target("0.5")
    assert grade("math", wrap("\\frac{1}{2}"), target) == 1.0  # through the worker, bare LaTeX wrapped in $...$
    assert grade("math", wrap("$\\frac{1}{3}$"), target) == 0.0
    assert grade("math", wrap("2\\sqrt{3}"), Target("\\sqrt{12}")) == 1.0
    assert grade("math", wrap("1" * 2000), Target("1")) == 0.0  # longer than any closed-form answer


def test_math_keeps_hang_prone_answers_from_math_verify(monkeypatch):
    """Invariant: the generic math reward runs geometry's guard, so an answer built to stall sympy (a huge or
    nested power, a factorial) is graded wrong without a math-verify call (here any call would fail the test)."""
    from gpg_vl import mathgrade

    def no_worker():
        raise AssertionError("math-verify was asked")

    monkeypatch.setattr(mathgrade, "shared_pool", no_worker)
    mathgrade._verify.cache_clear()
    for answer in ("9^{999}", "((9^{9})^{9})^{9}", "100!", "\\sqrt{" * 50 + "2" + "}" * 50):
        assert grade("math", wrap(answer), Target("3")) == 0.0, answer
    assert grade("math", wrap("3.0 cm"), Target("3")) == 1.0  # plain numbers never need the worker


def test_choice_reads_letters_texts_and_options_from_three_places():
    # options in the question: the answer may name the letter or the option text
    assert grade("choice", wrap("square"), Target("(B)", QUESTION)) == 1.0
    assert grade("choice", wrap("B or C"), Target("(B)", QUESTION)) == 0.0  # two letters pick nothing
    # a `choices` column wins over the question; the gold may be the option text itself
    assert grade("choice", wrap("(C)"), Target("blue", "Which colour?", ("red", "green", "blue"))) == 1.0
    # no options anywhere: letters alone, and "I" is not read as a letter
    assert grade("choice", wrap("I think B"), Target("B", "Pick one.")) == 1.0
    assert grade("choice", wrap("<answer>B</answer>"), Target("B", "Pick one.")) == 0.0  # nested tags


def test_iou_is_continuous():
    # [10,10,50,50] vs [30,10,70,50]: intersection 20*40 = 800, union 1600 + 1600 - 800 = 2400
    assert grade("iou", wrap("[30, 10, 70, 50]"), Target([10, 10, 50, 50])) == pytest.approx(1 / 3)
    # disjoint [60,60,90,90]: GIoU = 0 - (hull 80*80 - union 2500) / 6400 = -0.609375, reward + 1
    assert grade("giou", wrap("[60, 60, 90, 90]"), Target([10, 10, 50, 50])) == pytest.approx(0.390625)


def test_options_in_question():
    assert options_in(QUESTION) == ["circle", "square", "triangle", "diamond"]
    assert options_in("A. one\nB) two\nC: three") == ["one", "two", "three"]
    assert options_in("(B) no A first\n(C) x") == []
    assert options_in("A. only one") == []


@pytest.mark.parametrize(
    "name, target, message",
    [
        ("choice", Target("cat", "What animal?"), "neither a letter"),
        ("choice", Target("(E)", QUESTION), "names no option"),
        ("iou", Target([1, 2, 3]), "4 numbers"),
        ("iou", Target("[50, 50, 10, 10]"), "x1 < x2"),
        ("giou", Target(None), "text or a number"),
        ("math", Target("<answer>  </answer>"), "empty"),
        ("exact", Target(""), "empty"),
    ],
)
def test_a_gold_answer_a_reward_cannot_use_fails_at_once(name, target, message):
    with pytest.raises(ValueError, match=message):
        LIBRARY[name].gold(target)


# ---- configured rewards ---------------------------------------------------------------------------

FUNCTIONS = '''
def short(completions, solution, **columns):
    """1 for completions shorter than 20 characters; checks it got the columns as lists."""
    assert isinstance(solution, list) and len(solution) == len(completions)
    return [float(len(c) < 20) for c in completions]

def wrong_length(completions, **columns):
    return [1.0]

def not_finite(completions, **columns):
    return [float("nan")] * len(completions)

def not_numbers(completions, **columns):
    return ["high"] * len(completions)

def not_a_list(completions, **columns):
    return 3.0
'''


@pytest.fixture
def functions_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(FUNCTIONS)
    return path


def test_weights_make_the_total_and_components_stay_unweighted():
    rewards = build_rewards({"format": 0.5, "choice": 2.0})
    (components,) = score_batch(rewards, [wrap("(C)")], [Target("(C)", QUESTION)], [{}])
    assert components == {"format": 1.0, "choice": 1.0}
    out = combine(rewards, components)
    assert out.total == 2.5 and out.components == {"format": 1.0, "choice": 1.0}
    assert accuracy_component(rewards) == "choice" and accuracy_component(build_rewards({"format": 1, "iou": 1})) is None


def test_a_file_function_gets_the_columns_and_logs_under_its_name(functions_file):
    rewards = build_rewards({"exact": 1.0, f"{functions_file}:short": -0.5})
    assert [r.name for r in rewards] == ["exact", "short"]
    completions = [wrap("cat"), wrap("a much longer answer than that")]
    targets = [Target("cat"), Target("dog")]
    rows = [{"solution": "cat", "image": "a.png"}, {"solution": "dog", "image": "b.png"}]
    scores = score_batch(rewards, completions, targets, rows)
    assert scores == [{"exact": 1.0, "short": 0.0}, {"exact": 0.0, "short": 0.0}]
    assert score_batch(rewards, ["<answer>cat"], [Target("cat")], [rows[0]]) == [{"exact": 0.0, "short": 1.0}]
    assert combine(rewards, {"exact": 0.0, "short": 1.0}).total == -0.5


def test_a_module_function_reward(tmp_path, monkeypatch):
    (tmp_path / "team_rewards.py").write_text(FUNCTIONS)
    monkeypatch.syspath_prepend(str(tmp_path))
    (reward,) = build_rewards({"team_rewards:short": 1.0})
    assert reward.name == "short" and reward.compute(["tiny"], [Target("x")], [{"solution": "x"}]) == [1.0]


@pytest.mark.parametrize(
    "function, message",
    [
        ("wrong_length", r"wrong_length returned 1 values for 2 completions"),
        ("not_finite", r"not_finite returned nan at index 0"),
        ("not_numbers", r"not_numbers returned 'high' at index 0"),
        ("not_a_list", r"not_a_list returned a float"),
    ],
)
def test_a_function_returning_bad_values_is_named(functions_file, function, message):
    (reward,) = build_rewards({f"{functions_file}:{function}": 1.0})
    with pytest.raises(RewardError, match=message):
        reward.compute(["a", "b"], [Target("x")] * 2, [{}, {}])


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"formatt": 1.0}, r"unknown reward 'formatt'; built-in rewards: format, choice, math, iou, giou, exact, contains"),
        ({"format": float("nan")}, r"rewards.format: the weight must be a finite number, got nan"),
        ({"format": "high"}, r"the weight must be a finite number, got 'high'"),
        ({"format": True}, r"the weight must be a finite number, got True"),
        ({}, r"non-empty mapping"),
        (["format", "choice"], r"non-empty mapping"),
        ({"no_such_file.py:f": 1.0}, r"no_such_file.py"),
        ({"no_such_module_xyz:f": 1.0}, r"no_such_module_xyz"),
    ],
)
def test_bad_reward_specs_are_one_line_config_errors(spec, message):
    with pytest.raises(ConfigError, match=message) as info:
        build_rewards(spec)
    assert "\n" not in str(info.value)


def test_a_missing_function_or_a_clashing_name_fails(functions_file):
    with pytest.raises(ConfigError, match="has no function 'absent'"):
        build_rewards({f"{functions_file}:absent": 1.0})
    clash = functions_file.parent / "clash.py"
    clash.write_text("def exact(completions, **columns):\n    return [0.0] * len(completions)\n")
    with pytest.raises(ConfigError, match="two rewards log as the component 'exact'"):
        build_rewards({"exact": 1.0, f"{clash}:exact": 1.0})
