"""Rewards named in a config: a small library built from the paper tasks' pieces, or a user's function.

Library names: format, choice, math, iou, giou, exact, contains (see `LIBRARY`). Any other name is
`path/to/file.py:function` or `pkg.module:function` with TRL's signature
`(completions: list[str], **columns) -> list[float]`. `build_rewards({"format": 0.5, "choice": 1.0})`
checks names and weights once; `score_batch` gives each completion its named components, `combine` the
weighted total. The `generic` task (tasks/generic.py) is the user of this module.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gpg_vl.errors import ConfigError
from gpg_vl.mathgrade import grade_strict
from gpg_vl.parsing import LETTERS, answer_matches, extract_answer, format_ok, match_choice, normalise_answer
from gpg_vl.task import RewardOutput
from gpg_vl.boxes import Box, box_giou, box_iou, clip_box, parse_list_box, parse_point_pair_box

KEY = "task.options.rewards"
_GOLD_LETTER = re.compile(r"\(?\s*([A-Za-z])\s*\)?\.?")
# "(A) red", "A. red", "A) red", "A: red" at the start of a line of the question
_OPTION_LINE = re.compile(r"^[ \t]*\(?([A-Z])[).:][ \t]+(\S[^\n]*)$", re.MULTILINE)


class RewardError(ConfigError):
    """A configured reward function that returned the wrong number of values or a non-finite one."""


@dataclass(frozen=True)
class Target:
    """What the library rewards compare a completion with: one example's answer, question and options."""

    answer: Any  # the answer column's value, as the data holds it
    question: str = ""
    choices: tuple[str, ...] | None = None  # the example's `choices` column, when it has one


# ---- the library ----------------------------------------------------------------------------------


def answer_text(value: Any) -> str:
    """A gold answer as text: `<answer>..</answer>` unwrapped (R1-V's solutions), numbers written out."""
    if isinstance(value, bool) or not isinstance(value, (str, numbers.Real)):
        raise ValueError(f"answer must be text or a number, got {type(value).__name__}")
    text = str(value)
    inner = extract_answer(text)
    return (inner if inner is not None else text).strip()


def _nonempty_answer(target: Target) -> str:
    text = answer_text(target.answer)
    if not text:
        raise ValueError("answer is empty")
    return text


def options_in(question: str) -> list[str]:
    """The lettered options listed on their own lines of a question ("(A) red", "B. blue"), from A on."""
    options: list[str] = []
    for match in _OPTION_LINE.finditer(question):
        if match.group(1) != LETTERS[len(options)]:
            break  # a line like "C. ..." out of order is prose, not an option list
        options.append(match.group(2).strip())
    return options if len(options) >= 2 else []


def _choice_gold(target: Target) -> tuple[int, list[str]]:
    options = list(target.choices) if target.choices else options_in(target.question)
    truth = _nonempty_answer(target)
    letter = _GOLD_LETTER.fullmatch(truth)
    if letter:
        index = LETTERS.index(letter.group(1).upper())
        # No option list at all: the letters are the options. Four at least, so that a bare capital the
        # answer uses (B in "I think B") is read as a letter the way it would be with A-D listed.
        options = options or list(LETTERS[: max(index + 1, 4)])
        if index >= len(options):
            raise ValueError(f"answer {truth!r} names no option of {options}")
        return index, options
    normalised = [normalise_answer(o) for o in options]
    if normalise_answer(truth) in normalised:
        return normalised.index(normalise_answer(truth)), options
    raise ValueError(
        f"answer {truth!r} is neither a letter like '(B)' nor one of the options {options or '(none found)'}"
    )


def _choice(text: str, gold: tuple[int, list[str]]) -> float:
    index, options = gold
    return float(match_choice(extract_answer(text), options) == index)


def _math(text: str, gold: str) -> float:
    # geometry's strict rule: plain numbers compared here, the rest by math-verify behind the hang guard
    return float(grade_strict(extract_answer(text), gold))


def _box_gold(target: Target) -> Box:
    value = target.answer
    if isinstance(value, (list, tuple)):
        if len(value) != 4 or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value):
            raise ValueError(f"a box answer must be 4 numbers [x1, y1, x2, y2], got {list(value)[:8]}")
        raw: Box | None = tuple(float(v) for v in value)  # type: ignore[assignment]
    else:
        text = answer_text(value)
        raw = parse_list_box(text) or parse_point_pair_box(text)
    box = clip_box(raw, math.inf, math.inf) if raw else None
    if box is None:
        raise ValueError(f"answer {value!r} is not a box [x1, y1, x2, y2] with x1 < x2 and y1 < y2")
    return box


def _predicted_box(text: str) -> Box | None:
    answer = extract_answer(text)
    raw = (parse_list_box(answer) or parse_point_pair_box(answer)) if answer else None
    return clip_box(raw, math.inf, math.inf) if raw else None  # inverted boxes are wrong answers


def _iou(text: str, gold: Box) -> float:
    pred = _predicted_box(text)
    return box_iou(pred, gold) if pred else 0.0


def _giou(text: str, gold: Box) -> float:
    pred = _predicted_box(text)
    return box_giou(pred, gold) + 1.0 if pred else 0.0  # GIoU + 1 in [0, 2], so no box scores as GIoU = -1


def _exact(text: str, gold: str) -> float:
    return float(answer_matches(extract_answer(text), gold, "exact"))


def _contains(text: str, gold: str) -> float:
    return float(answer_matches(extract_answer(text), gold, "contains"))


@dataclass(frozen=True)
class LibraryReward:
    """A built-in reward: `gold` reads (and checks) an example's target, `grade` scores a completion on it."""

    name: str
    summary: str
    correctness: bool  # 1.0 means a right answer, so its mean is the task's `accuracy`
    gold: Callable[[Target], Any]
    grade: Callable[[str, Any], float]


LIBRARY: dict[str, LibraryReward] = {
    r.name: r
    for r in (
        LibraryReward("format", "1 if the completion is exactly <think>...</think><answer>...</answer>, else 0",
                      False, lambda t: None, lambda text, _: float(format_ok(text))),
        LibraryReward("choice", "1 if the <answer> picks the right lettered option ('(B)', 'B' or the option text)",
                      True, _choice_gold, _choice),
        LibraryReward("math", "1 if the <answer> equals the answer mathematically (geometry's strict rule, 5 s bound)",
                      True, _nonempty_answer, _math),
        LibraryReward("iou", "IoU of the <answer> box with the answer box, in [0, 1]", False, _box_gold, _iou),
        LibraryReward("giou", "GIoU + 1 of the <answer> box with the answer box, in [0, 2]", False, _box_gold, _giou),
        LibraryReward("exact", "1 if the <answer> equals the answer (case, spaces, underscores, final '.' ignored)",
                      True, _nonempty_answer, _exact),
        LibraryReward("contains", "1 if either of the <answer> and the answer is inside the other (normalised as exact)",
                      True, _nonempty_answer, _contains),
    )
}


# ---- configured rewards ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Reward:
    """One configured reward: the component it logs as (`reward/<name>`), its weight, and what computes it."""

    name: str  # the library name, or the user function's __name__
    weight: float
    target: str  # as the config wrote it: "choice", "my_rewards.py:length_penalty"
    library: LibraryReward | None = None
    function: Callable[..., Any] | None = None

    @property
    def correctness(self) -> bool:
        return self.library is not None and self.library.correctness

    def compute(self, completions: Sequence[str], targets: Sequence[Target], rows: Sequence[Mapping]) -> list[float]:
        """One value per completion. A user function gets every column of the rows as a list, aligned."""
        if self.library is not None:
            return [self.library.grade(c, self.library.gold(t)) for c, t in zip(completions, targets)]
        keys = list(dict.fromkeys(k for row in rows for k in row))
        columns = {k: [row.get(k) for row in rows] for k in keys}
        try:
            values = self.function(list(completions), **columns)
        except Exception as e:
            if hasattr(e, "add_note"):  # Python >= 3.11: the traceback then says whose function failed
                e.add_note(f"(in reward function {self.target})")
            raise
        return self._checked(values, len(completions))

    def _checked(self, values: Any, n: int) -> list[float]:
        try:
            values = list(values)
        except TypeError:
            raise RewardError(f"reward function {self.target} returned a {type(values).__name__}, not a list of floats") from None
        if len(values) != n:
            raise RewardError(f"reward function {self.target} returned {len(values)} values for {n} completions")
        out = []
        for i, v in enumerate(values):
            try:
                value = float(v)
            except (TypeError, ValueError):
                value = math.nan
            if isinstance(v, (bool, str)) or not math.isfinite(value):
                raise RewardError(f"reward function {self.target} returned {v!r} at index {i}; rewards must be finite numbers")
            out.append(value)
        return out


def build_rewards(spec: Any) -> list[Reward]:
    """The rewards of a `{name: weight}` mapping, in its order; one-line ConfigError on any bad entry."""
    if not isinstance(spec, Mapping) or not spec:
        raise ConfigError(
            f"{KEY} must be a non-empty mapping from reward name to weight, e.g. {{format: 0.5, choice: 1.0}}; "
            f"got {spec!r}", KEY)
    rewards: list[Reward] = []
    for target, weight in spec.items():
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
            raise ConfigError(f"{KEY}.{target}: the weight must be a finite number, got {weight!r}", KEY)
        reward = _resolve(str(target), float(weight))
        if reward.name in {r.name for r in rewards}:
            raise ConfigError(f"{KEY}: two rewards log as the component {reward.name!r}; rename a function", KEY)
        rewards.append(reward)
    return rewards


def _resolve(target: str, weight: float) -> Reward:
    if target in LIBRARY:
        return Reward(target, weight, target, library=LIBRARY[target])
    if ":" not in target:
        raise ConfigError(
            f"{KEY}: unknown reward {target!r}; built-in rewards: {', '.join(LIBRARY)} "
            "(or name a function as 'path/to/file.py:function' or 'pkg.module:function')", KEY)
    from gpg_vl.registry import import_plugin

    module_name, function_name = target.rsplit(":", 1)
    try:
        module = import_plugin(module_name)
    except (FileNotFoundError, ImportError) as e:
        raise ConfigError(f"{KEY}: reward {target!r}: {e}", KEY) from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"{KEY}: reward {target!r}: {module_name} has no function {function_name!r}", KEY)
    return Reward(getattr(function, "__name__", function_name), weight, target, function=function)


def score_batch(
    rewards: Sequence[Reward], completions: Sequence[str], targets: Sequence[Target], rows: Sequence[Mapping]
) -> list[dict[str, float]]:
    """The named components of each completion (aligned lists in, one dict per completion out)."""
    if not len(completions) == len(targets) == len(rows):
        raise ValueError(f"{len(completions)} completions, {len(targets)} targets and {len(rows)} rows")
    per_reward = {r.name: r.compute(completions, targets, rows) for r in rewards}
    return [{name: values[i] for name, values in per_reward.items()} for i in range(len(completions))]


def combine(rewards: Sequence[Reward], components: Mapping[str, float]) -> RewardOutput:
    """The weighted sum of the components as the total; the components unweighted, for logging."""
    return RewardOutput(sum(r.weight * components[r.name] for r in rewards), dict(components))


def accuracy_component(rewards: Sequence[Reward]) -> str | None:
    """The component whose mean is `accuracy`: the first correctness reward configured, if any."""
    return next((r.name for r in rewards if r.correctness), None)
