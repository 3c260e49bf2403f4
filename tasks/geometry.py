"""GEOQA geometry as R1-V: a figure and a question, a numeric answer graded by mathematical equivalence.

Trains on `leonardPKU/GEOQA_R1V_Train_8K` and evaluates on R1-V's `geoqa_test_prompts.jsonl`. math-verify
runs in worker processes (`gpg_vl.mathverify`) with a deadline per call; a cheap pre-check keeps answers
built to stall sympy away from it, and `metrics` grades a batch on all workers within a time budget.
`synthetic[:N]` draws triangles with given angles or sides instead.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from typing import Any

from gpg_vl.data import DataError, data_folder, read_records, resolve_image_ref, synthetic_spec, to_pil
from gpg_vl.mathverify import Check, shared_pool
from gpg_vl.parsing import extract_answer, format_ok
from gpg_vl.task import RewardOutput, Task
from gpg_vl_tasks.geometry_synthetic import make_synthetic

# R1-V's test prompt (src/eval/test_qwen2vl_geoqa.py); its training script puts two spaces before it.
INSTRUCTION = "Output the thinking process in <think> </think> and final answer (number) in <answer> </answer> tags."
MAX_ANSWER_CHARS = 1_000  # a strict answer longer than this is not a number; it is graded wrong unparsed
MAX_OUTPUT_CHARS = 20_000  # r1v parses at most the last 20k characters (R1-V's outputs stop at 1024 tokens)
# Bounds of a strict answer worth a math-verify call (see `strict_checkable`); GEOQA's answers sit far inside.
MAX_EXPRESSION_CHARS = 120
MAX_NESTING = 6
MAX_POWERS = 2


class GeometryTask(Task):
    """GEOQA (R1-V): reward = format + accuracy, accuracy by math-verify equivalence of the <answer> content."""

    name = "geometry"
    description = "GEOQA geometry (R1-V): numeric answers graded by math-verify; metrics r1v and strict."
    default_train_data = "leonardPKU/GEOQA_R1V_Train_8K"
    default_eval_data = None  # R1-V ships the test set as a JSONL in its repository, not on the hub
    missing_data_hint = (
        "the GEOQA test set is not on the hub; pass R1-V's src/eval/prompts/geoqa_test_prompts.jsonl (images under "
        "Geo170K/ next to it, or set the task option image_root), or synthetic[:N]"
    )

    def __init__(
        self,
        prompt_style: str = "instruct",
        image_root: str | None = None,
        verify_timeout_s: float = 5.0,
        grading_budget_s: float | None = None,
        synthetic_easy: bool = False,
        **options,
    ):
        """verify_timeout_s: deadline of one math-verify call. grading_budget_s: the most one `metrics` call
        spends in math-verify per protocol (r1v, strict); default max(30 s, 0.5 s per completion), far above
        what real answers need (tens of ms each). Answers still ungraded then count as wrong, with a warning."""
        super().__init__(prompt_style=prompt_style, **options)
        if not verify_timeout_s > 0:
            raise ValueError(f"geometry: verify_timeout_s must be positive, got {verify_timeout_s!r}")
        if grading_budget_s is not None and not grading_budget_s > 0:
            raise ValueError(f"geometry: grading_budget_s must be positive, got {grading_budget_s!r}")
        self.image_root, self.verify_timeout_s = image_root, float(verify_timeout_s)
        self.synthetic_easy = bool(synthetic_easy)
        self.grading_budget_s = None if grading_budget_s is None else float(grading_budget_s)

    def load(self, path: str | None = None, split: str = "train") -> list[dict]:
        path = self.data_path(path, split)
        spec = synthetic_spec(path, split)
        if spec is not None:
            return make_synthetic(*spec, easy=self.synthetic_easy)
        rows = read_records(path, split)
        base_dir = self.image_root or data_folder(path)
        return [_example_from_row(row, i, base_dir, f"{path}: row {i}") for i, row in enumerate(rows)]

    def messages(self, example: dict) -> list[dict]:
        image = to_pil(example["image"], where=self.origin(example))
        return self.conversation([image], f"{example['question']} {INSTRUCTION}")

    def score(self, completion: str, example: dict) -> RewardOutput:
        text = self.full_completion(completion)
        fmt = float(format_ok(text))
        accuracy = float(grade_strict(extract_answer(text), example["ground_truth"], self.verify_timeout_s))
        return RewardOutput(fmt + accuracy, {"format": fmt, "accuracy": accuracy})

    def metrics(self, examples: Sequence[dict], completions: Sequence[str]) -> dict[str, float]:
        """`r1v`: R1-V's test protocol, math-verify on the whole output. `strict`: the <answer> content only.

        r1v reproduces published numbers, flaws included: math-verify takes the last number it can anchor in
        the whole text, which may come from the reasoning, misses numbers glued to tags (`<answer>70</answer>`),
        and reads a bare ground truth `2√{3}` as 2. strict grades the last <answer> block alone, after reading
        units, degree signs, `√{}` and `π` as LaTeX (see `normalize_answer`), so `140` = `140°`, `2\\sqrt{3}` =
        `2√{3}` and `2` != `2√{3}`.
        """
        if len(examples) != len(completions):
            raise ValueError(f"{len(examples)} examples but {len(completions)} completions")
        if not examples:
            return {"r1v": 0.0, "strict": 0.0}
        texts = [c if isinstance(c, str) else "" for c in completions]
        truths = [ex["ground_truth"] for ex in examples]
        # Each protocol grades its batch on all math-verify workers at once, within its own budget.
        budget = self.grading_budget_s or max(30.0, 0.5 * len(texts))
        r1v = grade_r1v_many(texts, truths, self.verify_timeout_s, budget)
        answers = [extract_answer(self.full_completion(c)) for c in texts]
        strict = grade_strict_many(answers, truths, self.verify_timeout_s, budget)
        return {"r1v": sum(r1v) / len(examples), "strict": sum(strict) / len(examples)}

    def reference_answer(self, example: dict) -> str | None:
        return example["ground_truth"]

    def record_fields(self, example: dict) -> dict[str, Any]:
        fields = {k: example[k] for k in ("id", "question", "ground_truth", "kind") if k in example}
        if isinstance(example.get("image"), str):
            fields["image_path"] = example["image"]
        return fields



# ---- loading ------------------------------------------------------------------------------------



def _example_from_row(row: Any, index: int, base_dir: str | None, where: str) -> dict:
    """R1-V's test row (image_path, question, ground_truth) or the hub train row (image, problem, solution)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if {"image_path", "question", "ground_truth"} <= set(row):
        image, question, truth = row["image_path"], row["question"], row["ground_truth"]
    elif {"image", "problem", "solution"} <= set(row):
        image, question, truth = row["image"], row["problem"], row["solution"]
        truth = extract_answer(str(truth)) or str(truth)  # the solution is "<answer> 140° </answer>"
    else:
        raise DataError(
            f"{where}: expected (image_path, question, ground_truth) or (image, problem, solution), got {sorted(row)}"
        )
    if not str(truth).strip() or not str(question).strip():
        raise DataError(f"{where}: empty question or ground truth")
    return {
        "origin": where,
        "id": str(row.get("id", index)),
        "image": resolve_image_ref(image, base_dir, where),
        "question": str(question).strip(),
        "ground_truth": str(truth).strip(),
    }



# ---- grading ------------------------------------------------------------------------------------

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
        return math.isclose(float(pred), float(gold), rel_tol=1e-9, abs_tol=1e-9)  # the common case, no worker
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
            verdicts.append(math.isclose(float(pred), float(gold), rel_tol=1e-9, abs_tol=1e-9))
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
