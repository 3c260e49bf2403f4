"""Parsing of the `<think>...</think><answer>...</answer>` completion format shared by the tasks.

Kept strict and regex-only so scoring never raises and stays fast on adversarial strings (very long,
nested tags, unicode): every pattern is linear-time and anchored.
"""

from __future__ import annotations

import re

THINK_ANSWER_INSTRUCTION = (
    "Output the thinking process in <think> </think> and final answer in <answer> </answer> tags."
)

_TAG = re.compile(r"</?(?:think|answer)>")
_FORMAT = re.compile(r"\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def format_ok(completion: str) -> bool:
    """True when the completion is exactly one <think> block then one <answer> block, nothing else."""
    match = _FORMAT.fullmatch(completion)
    return bool(match) and len(_TAG.findall(completion)) == 4


def extract_think(completion: str) -> str | None:
    """The text inside the first <think>...</think>, stripped; None when absent."""
    match = re.search(r"<think>(.*?)</think>", completion, re.DOTALL)
    return match.group(1).strip() if match else None


def extract_answer(completion: str) -> str | None:
    """The text inside the last <answer>...</answer>, stripped; None when absent.

    The last block is taken, as R1-V and Visual-RFT do, so a model that restates its answer is graded on
    its final word.
    """
    found = _ANSWER.findall(completion)
    return found[-1].strip() if found else None


_LETTER = re.compile(r"^\(?([A-Z])\)?(?=$|[\s.:,)])")
_ANY_LETTER = re.compile(r"\(([A-Z])\)")


def match_choice(answer: str, choices: list[str]) -> int | None:
    """Index of the choice an answer names, by letter (`B`, `(B)`, `(B) blue`) or by its text; else None.

    An answer that names two different letters, or matches no choice, names none.
    """
    text = answer.strip()
    letters = set(_ANY_LETTER.findall(text))
    first = _LETTER.match(text)
    if first:
        letters.add(first.group(1))
    if len(letters) > 1:
        return None
    if letters:
        index = ord(letters.pop()) - ord("A")
        return index if index < len(choices) else None
    norm = _normalize(text)
    named = [i for i, c in enumerate(choices) if _normalize(str(c)) == norm]
    return named[0] if len(named) == 1 else None


def _normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())
