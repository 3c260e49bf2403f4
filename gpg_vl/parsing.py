"""Parsing of the `<think>...</think><answer>...</answer>` completion format shared by the tasks, and the
one answer normalisation (`normalise_answer`, `answer_matches`, `match_choice`) every reward and task uses.

Kept strict so scoring never raises, and linear-time so it stays fast on hostile strings (megabytes of
repeated or unclosed tags, digit runs, unicode): tags are found with str.find, never with a lazy `.*?`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

THINK_ANSWER_INSTRUCTION = (
    "Output the thinking process in <think> </think> and final answer in <answer> </answer> tags."
)
# R1's system prompt (as R1-V and Visual-RFT use it) for prompt_style="base": the conversation then ends in
# an assistant turn opened with "<think>", which the model continues.
R1_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant "
    "first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning "
    "process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think><answer> answer here </answer>"
)
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

_TAG = re.compile(r"</?(?:think|answer)>")
_FORMAT_TAGS = ["<think>", "</think>", "<answer>", "</answer>"]

# Trap: the obvious patterns (`<answer>(.*?)</answer>` with findall, a lazy fullmatch of the whole format)
# rescan the rest of the text from every unclosed tag, so 100 KB of repeated `<answer>` took seconds and
# 1 MB never finished. Everything below walks the text once with str.find and keeps the regexes' results.


def format_ok(completion: str) -> bool:
    """True when the completion is exactly one <think> block then one <answer> block, nothing else.

    Only whitespace may sit before <think>, between </think> and <answer>, and after </answer>.
    """
    tags = []
    for match in _TAG.finditer(completion):
        if len(tags) == len(_FORMAT_TAGS) or match.group() != _FORMAT_TAGS[len(tags)]:
            return False  # a fifth tag, or one out of order: stop at once instead of listing them all
        tags.append(match)
    if len(tags) != len(_FORMAT_TAGS):
        return False
    outside = (completion[: tags[0].start()], completion[tags[1].end() : tags[2].start()], completion[tags[3].end() :])
    return all(not gap.strip() for gap in outside)  # str.strip and the regex `\s` share one whitespace table


def extract_think(completion: str) -> str | None:
    """The text inside the first <think>...</think>, stripped; None when absent."""
    start = completion.find("<think>")
    end = completion.find("</think>", start + len("<think>")) if start >= 0 else -1
    return completion[start + len("<think>") : end].strip() if end >= 0 else None


def _answer_blocks(completion: str) -> Iterator[str]:
    """The contents of the <answer>...</answer> blocks, left to right, unstripped.

    As `re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)` pairs them: each block runs from an
    <answer> to the first </answer> after it, so `<answer>a<answer>b</answer>` is one block `a<answer>b`.
    """
    open_tag, close_tag, pos = "<answer>", "</answer>", 0
    while (start := completion.find(open_tag, pos)) >= 0:
        end = completion.find(close_tag, start + len(open_tag))
        if end < 0:
            return  # no later <answer> can be closed either
        yield completion[start + len(open_tag) : end]
        pos = end + len(close_tag)


def extract_answer(completion: str) -> str | None:
    """The text inside the last <answer>...</answer>, stripped; None when absent.

    The last block is taken, as R1-V and Visual-RFT do, so a model that restates its answer is graded on
    its final word.
    """
    last = None
    for last in _answer_blocks(completion):
        pass
    return last.strip() if last is not None else None


_PAREN_LETTER = re.compile(r"\(\s*([A-Za-z])\s*\)")
_BARE_LETTER = re.compile(r"(?<![A-Za-z0-9])([A-Z])(?![A-Za-z0-9])")
# "A chair" is the article, "A or B" / "A is right" name the letter.
_ARTICLE_AFTER = re.compile(r"\s+(?!(?:or|and|is|nor|vs)\b)[a-z]")


def match_choice(answer: str | None, choices: Sequence[str]) -> int | None:
    """The choice an <answer> text picks, or None when it picks none or several.

    In order: the whole answer equals a choice text ("left", "3"); else the letters it names ("(B)", "B",
    "B." or "(b)") must be exactly one, and a valid one; else exactly one choice text must appear in it as a
    whole word. A bare "A" before a lowercase word other than or/and/is/nor/vs is the article, so "A chair"
    names no letter while "A or B" names two. An answer holding think/answer tags (nested tags) picks nothing.
    """
    if answer is None or _TAG.search(answer):
        return None
    norm = normalise_answer(answer)
    texts = [normalise_answer(c) for c in choices]
    if norm in texts:
        return texts.index(norm)
    letters = {m.group(1).upper() for m in _PAREN_LETTER.finditer(answer)}
    for m in _BARE_LETTER.finditer(answer):
        if len(letters) > 1:
            break  # two letters already: the answer hedges, nothing more can change that
        letter = m.group(1)
        # a bare capital names a choice only if there is such a choice: "I think B" names B alone
        if letter in letters or letter not in LETTERS[: len(choices)]:
            continue
        if not (letter == "A" and _ARTICLE_AFTER.match(answer, m.end())):
            letters.add(letter)
    if len(norm) == 1 and norm.isalpha():
        letters.add(norm.upper())
    if letters:
        index = LETTERS.find(letters.pop()) if len(letters) == 1 else -1
        return index if index in range(len(choices)) else None
    named = [i for i, t in enumerate(texts) if t and re.search(rf"(?<!\w){re.escape(t)}(?!\w)", norm)]
    return named[0] if len(named) == 1 else None


def normalise_answer(text: str) -> str:
    """An answer as compared everywhere: lower case, `_` read as a space, runs of whitespace as one space,
    and leading or trailing spaces and dots dropped. `" Pink_Primrose. "` -> `"pink primrose"`."""
    return " ".join(text.lower().replace("_", " ").split()).strip(" .")


MATCH_RULES = ("exact", "contains")


def answer_matches(answer: str | None, gold: str, rule: str = "exact") -> bool:
    """Whether an <answer> text names `gold`; the one rule behind the `exact` and `contains` rewards of the
    generic task and the `match` option of classification. A missing answer, or one holding tags, never matches.

    Both compare `normalise_answer` forms with the spaces removed (Visual-RFT's classification reward drops
    spaces and underscores, so `pinkprimrose` = `pink primrose`). exact: equal. contains: either inside the
    other, Visual-RFT's rule, so a label inside a longer one matches it (Flowers102's `rose` is inside
    `pink primrose`); unlike Visual-RFT's script, an empty answer matches nothing.
    """
    if rule not in MATCH_RULES:
        raise ValueError(f"match rule must be one of {', '.join(MATCH_RULES)}; got {rule!r}")
    if answer is None or _TAG.search(answer):
        return False
    a, b = normalise_answer(answer).replace(" ", ""), normalise_answer(gold).replace(" ", "")
    if rule == "exact":
        return a == b
    return bool(a) and bool(b) and (a in b or b in a)
