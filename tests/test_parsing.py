"""The shared completion parsers: the same answers as the regexes they replace, in time linear in the text."""

from __future__ import annotations

import random
import re

import pytest

from gpg_vl.parsing import _answer_blocks, answer_matches, extract_answer, extract_think, format_ok, match_choice

# The regex versions these parsers replaced (quadratic on unclosed tags); kept here as the reference meaning.
_TAG = re.compile(r"</?(?:think|answer)>")
_FORMAT = re.compile(r"\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _format_ok_regex(text: str) -> bool:
    return bool(_FORMAT.fullmatch(text)) and len(_TAG.findall(text)) == 4


def _extract_answer_regex(text: str) -> str | None:
    found = _ANSWER.findall(text)
    return found[-1].strip() if found else None


def _extract_think_regex(text: str) -> str | None:
    match = re.search(r"<think>(.*?)</think>", text, re.DOTALL)
    return match.group(1).strip() if match else None


# Pieces that make the parsers' edge cases likely: every tag, tag fragments, ASCII and Unicode whitespace.
_PIECES = ["<think>", "</think>", "<answer>", "</answer>", " ", "\n", "\u00a0", "\u3000", "x", "(B)", "<", ">", "/"]


def _random_texts(n: int, seed: int = 0):
    rng = random.Random(seed)
    for _ in range(n):
        yield "".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 12)))


def test_same_results_as_the_regexes_on_random_tag_soup():
    for text in _random_texts(20_000):
        assert format_ok(text) == _format_ok_regex(text), text
        assert extract_answer(text) == _extract_answer_regex(text), text
        assert extract_think(text) == _extract_think_regex(text), text
        assert list(_answer_blocks(text)) == _ANSWER.findall(text), text


@pytest.mark.parametrize(
    "text, ok",
    [
        ("<think>a</think><answer>b</answer>", True),
        (" \n<think>a</think>\u00a0<answer>b</answer>\n", True),  # Unicode whitespace counts, as `\s` did
        ("<think></think><answer></answer>", True),
        ("<answer>b</answer><think>a</think>", False),  # order
        ("<think>a</think>x<answer>b</answer>", False),  # text between the blocks
        ("<think>a</think><answer>b</answer><answer>c</answer>", False),  # a second answer
        ("<think>a<think></think><answer>b</answer>", False),  # a nested tag
        ("<think>a</think><answer>b", False),  # unclosed
        ("", False),
    ],
)
def test_format_ok_cases(text, ok):
    assert format_ok(text) is ok


def test_answer_pairs_each_open_tag_with_the_next_close_tag():
    # The regex paired `<answer>` with the FIRST `</answer>` after it; the last such block is the answer.
    assert extract_answer("<answer>a<answer>b</answer>") == "a<answer>b"
    assert extract_answer("<answer>a</answer> then <answer> c </answer><answer>open") == "c"
    assert extract_answer("</answer><answer>") is None
    assert extract_think("<think><think>a</think></think>") == "<think>a"
    assert extract_think("</think><think>a") is None


def test_match_choice_unchanged_on_ordinary_answers():
    choices = ["red", "green", "blue", "yellow"]
    assert match_choice("(B)", choices) == 1
    assert match_choice("green", choices) == 1
    assert match_choice("A or B", choices) is None
    assert match_choice("A chair", choices) is None
    assert match_choice("<answer>(B)", choices) is None


# ---- one answer normalisation for every task ------------------------------------------------------

AGREEMENT_CASES = [
    ("pink primrose", "pink primrose"), ("Pink_Primrose.", "pink primrose"), (" pink  primrose ", "pink primrose"),
    ("pinkprimrose", "pink primrose"), ("rose", "pink primrose"), ("a pink primrose flower", "pink primrose"),
    ("sunflower", "pink primrose"), ("", "pink primrose"), ("<answer>x", "x"), ("Blue", "blue"), ("dark blue", "blue"),
    ("3", "3"), ("3.0", "3"), ("A", "a chair"), ("粉红 primrose ☃", "pink primrose"),
]


@pytest.mark.parametrize("rule", ["exact", "contains"])
@pytest.mark.parametrize("answer, gold", AGREEMENT_CASES)
def test_generic_rewards_and_classification_give_the_same_verdicts(rule, answer, gold):
    """Invariant: the generic task's `exact`/`contains` rewards and classification's `match` of the same name agree
    on every answer, because both call parsing.answer_matches (they used to normalise three different ways)."""
    from gpg_vl.rewards import LIBRARY, Target
    from gpg_vl_tasks.classification import ClassificationTask

    completion = f"<think>x</think><answer>{answer}</answer>"
    reward = LIBRARY[rule]
    generic = reward.grade(completion, reward.gold(Target(gold)))
    classification = ClassificationTask(match=rule).score(completion, {"label": gold}).components["accuracy"]
    assert generic == classification == float(answer_matches(answer, gold, rule))


def test_answer_matches_hand_cases():
    assert answer_matches("Pink_Primrose.", "pink primrose") and answer_matches("pinkprimrose", "Pink Primrose")
    assert not answer_matches("rose", "pink primrose") and answer_matches("rose", "pink primrose", "contains")
    assert not answer_matches("", "rose", "contains") and not answer_matches("<think>rose", "rose", "contains")
    with pytest.raises(ValueError, match="match rule must be one of exact, contains; got 'fuzzy'"):
        answer_matches("rose", "rose", "fuzzy")
