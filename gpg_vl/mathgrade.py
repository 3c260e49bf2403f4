"""Math grading: is an answer the same number or expression as the ground truth (math-verify, bounded)?

Library code, so the generic `math` reward and the `geometry` task grade alike. `grade_strict` normalises
an <answer> (units, `°`, `\\boxed{}`, prose prefixes), compares plain numbers here and sends the rest to
math-verify in a worker with a deadline (`gpg_vl.mathverify`), after a cheap guard against answers built to
stall sympy. `grade_r1v` is R1-V's test rule on a whole output.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence

from gpg_vl.mathverify import Check, shared_pool

MAX_ANSWER_CHARS = 1_000  # a strict answer longer than this is not a number; it is graded wrong unparsed
MAX_OUTPUT_CHARS = 20_000  # r1v parses at most the last 20k characters (R1-V's outputs stop at 1024 tokens)
# Bounds of a strict answer worth a math-verify call (see `strict_checkable`); GEOQA's answers sit far inside.
MAX_EXPRESSION_CHARS = 120
MAX_NESTING = 6
MAX_POWERS = 2


def numbers_equal(pred: str, gold: str) -> bool:
    """Two plain decimal numbers are equal up to float rounding (the one tolerance every grader uses)."""
    return math.isclose(float(pred), float(gold), rel_tol=1e-9, abs_tol=1e-9)


def is_number(text: str) -> bool:
    """`text` is a plain decimal number such as `-3`, `0.5` or `.5` (compared by `numbers_equal`, no worker)."""
    return bool(_NUMBER.match(text))


_DELIMITERS = re.compile(r"^\s*(?:\$+|\\\(|\\\[)|(?:\$+|\\\)|\\\])\s*$")
_BOXED = re.compile(r"^\\boxed\{(.*)\}$", re.DOTALL)
_PROSE_PREFIX = re.compile(r"^.*(?:\bis\b|\banswer\s*:|=)", re.DOTALL | re.IGNORECASE)  # "C is 70", "x = 70"
# A trailing unit or degree sign after a number, brace, bracket, π or space: the GEOQA test set's units.
_UNITS = "|".join(
    [r"°", r"\^\s*\{?\s*\\circ\s*\}?", r"\\circ", r"degrees?", r"度"]  # angles
    + [r"[cmdk]?m", r"units?", r"平方厘米", r"平方米", r"[厘毫分千]?米", r"海里", r"秒", r"小时", r"分钟"]  # lengths, time
)
_POWER = r"(?:\s*\^\s*\{?\s*[23]\s*\}?\^?|²|³)?"  # cm^2, cm^{2}, cm², GEOQA's "cm^2^"
_UNIT = re.compile(
    # Possessive `\s*+`: no unit starts with a space, and two plain `\s*` around the optional `\text{` split a
    # run of spaces every possible way (cubic: 1000 spaces took 10 s).
    r"(?<=[\d})π\s])\s*+(?:(?:\\text\{|\\mathrm\{)\s*+)?" + rf"(?:{_UNITS})(?:\s*\}})?{_POWER}(?:\s*\}})?\s*$"
)
_SQRT_BARE = re.compile(r"\\sqrt\s*(\d+(?:\.\d+)?)")
_SQRT_CALL = re.compile(r"\\?sqrt\s*\(([^()]*)\)")  # "2sqrt(3)" -> "2\sqrt{3}"
_PLAIN_PI = re.compile(r"(?<![\\A-Za-z])pi(?![A-Za-z])")  # "8pi" -> "8\pi"
_NUMBER = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)$")
_WORD = re.compile(r"[A-Za-z]{2,}")
# Powers with a 3+ digit or nested exponent, and factorials, make sympy compute for minutes; no GEOQA answer
# has one, so they are graded wrong without asking math-verify.
_HANG_PRONE = re.compile(r"\^\s*\{?\s*(?:\d{3}|[\d.]{4})|\^\s*\{[^{}]*\^|\^\s*\d+\s*\^|!")


@functools.lru_cache(maxsize=65536)
def normalize_answer(text: str) -> str:
    """An answer as one LaTeX expression: delimiters, `\\boxed{}`, a prose or `x =` prefix, units, `°` removed;
    `√{3}` -> `\\sqrt{3}`, `π` -> `\\pi`. E.g. `∠C = 70°` -> `70`, `2√{3}cm` -> `2\\sqrt{3}`."""
    s = _DELIMITERS.sub("", text.strip()).strip()
    boxed = _BOXED.match(s)
    s = (boxed.group(1) if boxed else s).strip().rstrip(".。").strip()
    s = _PROSE_PREFIX.sub("", s).strip()
    for _ in range(3):  # "25πcm^{2}" has one unit; a few rounds cover "3 cm." and "cm}" leftovers
        stripped = _UNIT.sub("", s).strip()
        if stripped == s or not stripped:
            break
        s = stripped
    s = _PLAIN_PI.sub(r"\\pi ", _SQRT_CALL.sub(r"\\sqrt{\1}", s))
    s = s.replace("√", "\\sqrt").replace("π", "\\pi ").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return _SQRT_BARE.sub(r"\\sqrt{\1}", s).strip()


def strict_checkable(answer: str | None) -> str | None:
    """The normalised <answer> content when it is worth asking math-verify about, else None (graded wrong).

    The cheap pre-check that keeps hostile answers from the worker's deadline: GEOQA answers are short
    expressions (`2\\sqrt{3}`, `\\frac{25\\pi}{6}`), so an answer too long or too deeply nested, with prose
    left over, a big or nested power or a factorial, is wrong without a call. Each of those made sympy run
    past the 5 s deadline (a `\\sqrt{` nested 300 deep, `(((9^{99})^{99})^{99})^{99}`).
    """
    if not answer or len(answer) > MAX_ANSWER_CHARS:
        return None
    pred = normalize_answer(answer)
    if _NUMBER.match(pred):
        return pred  # compared as a float, never sent to math-verify
    if not pred or len(pred) > MAX_EXPRESSION_CHARS or _WORD.search(re.sub(r"\\[A-Za-z]+", "", pred)):
        return None
    if _HANG_PRONE.search(pred) or pred.count("^") > MAX_POWERS or _depth(pred) > MAX_NESTING:
        return None
    return pred


def grade_strict(answer: str | None, ground_truth: str, timeout_s: float = 5.0) -> bool:
    """True when the <answer> content equals the ground truth mathematically (units and `°` ignored)."""
    pred = strict_checkable(answer)
    if pred is None:
        return False
    gold = normalize_answer(ground_truth)
    if _NUMBER.match(pred) and _NUMBER.match(gold):
        return numbers_equal(pred, gold)  # the common case, no worker
    return _verify("strict", f"${gold}$", f"${pred}$", timeout_s)


def grade_r1v(output: str, ground_truth: str, timeout_s: float = 5.0) -> bool:
    """R1-V's test-script rule: `verify(parse(output), parse(ground_truth))` on the whole output."""
    return shared_pool().verify(Check("r1v", ground_truth, output[-MAX_OUTPUT_CHARS:]), timeout_s)


def grade_r1v_many(
    outputs: Sequence[str], ground_truths: Sequence[str], timeout_s: float = 5.0, budget_s: float | None = None
) -> list[bool]:
    """`grade_r1v` over a batch on all math-verify workers at once, the whole batch within `budget_s`."""
    checks = [Check("r1v", gt, out[-MAX_OUTPUT_CHARS:]) for out, gt in zip(outputs, ground_truths, strict=True)]
    return shared_pool().verify_many(checks, timeout_s, budget_s)


def grade_strict_many(
    answers: Sequence[str | None], ground_truths: Sequence[str], timeout_s: float = 5.0, budget_s: float | None = None
) -> list[bool]:
    """`grade_strict` over a batch: numbers compared here, the rest on all workers at once within `budget_s`."""
    verdicts: list[bool | None] = []
    asks: dict[Check, list[int]] = {}  # a group of rollouts repeats answers: one call per distinct question
    for i, (answer, truth) in enumerate(zip(answers, ground_truths, strict=True)):
        pred, gold = strict_checkable(answer), normalize_answer(truth)
        if pred is None:
            verdicts.append(False)
        elif _NUMBER.match(pred) and _NUMBER.match(gold):
            verdicts.append(numbers_equal(pred, gold))
        else:
            verdicts.append(None)
            asks.setdefault(Check("strict", f"${gold}$", f"${pred}$"), []).append(i)
    for check, ok in zip(asks, shared_pool().verify_many(list(asks), timeout_s, budget_s)):
        for i in asks[check]:
            verdicts[i] = ok
    return [bool(v) for v in verdicts]


@functools.lru_cache(maxsize=65536)
def _verify(op: str, gold: str, pred: str, timeout_s: float) -> bool:
    # Cached (short answers only): a group of rollouts repeats answers, and a string that timed out once
    # would time out again.
    return shared_pool().verify(Check(op, gold, pred), timeout_s)


def _depth(text: str) -> int:
    """The deepest nesting of (), {} and [] in `text`."""
    depth = deepest = 0
    for char in text:
        if char in "({[":
            depth += 1
            deepest = max(deepest, depth)
        elif char in ")}]":
            depth -= 1
    return deepest
