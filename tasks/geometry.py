"""GEOQA geometry as R1-V: a figure and a question, a numeric answer graded by mathematical equivalence.

Trains on `leonardPKU/GEOQA_R1V_Train_8K` and evaluates on R1-V's `geoqa_test_prompts.jsonl`. math-verify
runs in worker processes (`gpg_vl.mathverify`) with a deadline per call; a cheap pre-check keeps answers
built to stall sympy away from it, and `metrics` grades a batch on all workers within a time budget.
`synthetic[:N]` draws triangles with given angles or sides instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gpg_vl.data import DataError, data_folder, read_records, resolve_image_ref, synthetic_spec, to_pil
from gpg_vl.mathgrade import grade_r1v_many, grade_strict, grade_strict_many
from gpg_vl.parsing import extract_answer, format_ok
from gpg_vl.task import RewardOutput, Task
from gpg_vl_tasks.geometry_synthetic import make_synthetic

# R1-V's test prompt (src/eval/test_qwen2vl_geoqa.py); its training script puts two spaces before it.
INSTRUCTION = "Output the thinking process in <think> </think> and final answer (number) in <answer> </answer> tags."


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
        units, degree signs, `√{}` and `π` as LaTeX (see `gpg_vl.mathgrade.normalize_answer`), so `140` = `140°`, `2\\sqrt{3}` =
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
