"""Spatial multiple choice as in the GPG paper: train on SAT (`array/SAT`), evaluate on CV-Bench.

Rows of both datasets become one example form whose answer is a letter like "(B)". The reward is format
(<think> then <answer>) plus accuracy (the answer names the right letter or the right choice text). Metrics
give accuracy per CV-Bench task, `Total` micro-averaged over all items (the paper's protocol) and lmms-eval's
per-source average as `lmms_eval_overall`. `synthetic[:N]` draws an offline twin (`cvbench_synthetic.py`).
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpg_vl.data import DataError, read_records, resolve_image_ref, synthetic_spec, to_pil
from gpg_vl.parsing import LETTERS, THINK_ANSWER_INSTRUCTION, extract_answer, format_ok, match_choice
from gpg_vl.task import RewardOutput, Task
from gpg_vl_tasks.cvbench_synthetic import TASKS, make_rows, render_prompt

CVBENCH_TASKS = ("Count", "Relation", "Depth", "Distance")

class CVBenchTask(Task):
    name = "cvbench"
    description = "Spatial multiple choice: train on SAT, evaluate on CV-Bench (Count, Relation, Depth, Distance)."
    default_train_data = "array/SAT"
    default_eval_data = "nyu-visionx/CV-Bench"
    default_eval_split = "test"

    def __init__(
        self,
        prompt_style: str = "instruct",
        multi_image: bool = False,
        shuffle_seed: int = 0,
        synthetic_image_size: int = 112,
        synthetic_tasks: Sequence[str] = TASKS,
        synthetic_easy: bool = False,
        **options: Any,
    ) -> None:
        """prompt_style: instruct | base. multi_image: keep SAT rows with two images (dropped by default, as
        VisualThinker-R1-Zero does). shuffle_seed: seed of the SAT choice order. synthetic_image_size: side
        in pixels of the offline twin's images. synthetic_tasks: the CV-Bench tasks the twin draws (default
        all four). synthetic_easy: the twin's Count drawn as 1-4 squares filling the image's quarters in
        reading order, no distractors, choices 1-4 in order (what the tiny model learns in minutes: benchmarks/twins/cvbench.yaml)."""
        super().__init__(prompt_style=prompt_style, **options)
        self.multi_image = bool(multi_image)
        self.shuffle_seed = int(shuffle_seed)
        self.synthetic_image_size = int(synthetic_image_size)
        self.synthetic_tasks, self.synthetic_easy = tuple(synthetic_tasks), bool(synthetic_easy)
        make_rows(0, 0, tasks=self.synthetic_tasks)  # an unknown task name fails here, not at load

    # ---- data ------------------------------------------------------------------------------------
    def load(self, path: str | None = None, split: str = "train") -> list[dict]:
        """SAT or CV-Bench rows (hub id, local parquet/JSONL/folder) or `synthetic[:N]`, as examples."""
        path = self.data_path(path, split)
        spec = synthetic_spec(path, split)
        if spec is not None:
            size, seed = spec
            rows = make_rows(size, seed, self.synthetic_image_size, self.synthetic_tasks, self.synthetic_easy)
            where = f"synthetic split {split!r} row"
            return [self._from_cvbench(row, i, f"{where} {i}", None) for i, row in enumerate(rows)]
        local = Path(path).expanduser()
        base_dir = (local if local.is_dir() else local.parent) if local.exists() else None
        examples = []
        for i, row in enumerate(read_records(path, split)):
            where = f"{path} (split {split!r}) row {i}"
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a record, got {type(row).__name__}")
            if "image_bytes" in row:
                example = self._from_sat(row, i, split, where)
            elif "choices" in row:
                example = self._from_cvbench(row, i, where, base_dir)
            else:
                raise DataError(
                    f"{where}: neither SAT (image_bytes, ...) nor CV-Bench (choices, ...) schema; keys: {sorted(row)}"
                )
            if example is not None:
                examples.append({**example, "origin": where})
        if not examples:
            raise DataError(f"{path} (split {split!r}): no usable rows (multi-image rows need multi_image=True)")
        return examples

    def _from_sat(self, row: dict, index: int, split: str, where: str) -> dict | None:
        images = _as_list(row.get("image_bytes"))
        if not images:
            raise DataError(f"{where}: 'image_bytes' must be a non-empty list of images")
        if len(images) > 1 and not self.multi_image:
            return None
        choices = [str(a) for a in _as_list(row.get("answers"))]
        correct = row.get("correct_answer")
        if not choices or len(choices) > len(LETTERS) or correct is None or str(correct) not in choices:
            raise DataError(f"{where}: 'correct_answer' {correct!r} must be one of 1-{len(LETTERS)} 'answers' {choices!r}")
        # SAT lists the right answer at a fixed position; a seeded shuffle per row removes that shortcut.
        random.Random(f"{self.shuffle_seed}:{index}").shuffle(choices)
        question = _text(row, "question", where)
        return {
            "id": f"sat-{split}-{index}",
            "images": images,
            "question": question,
            "choices": choices,
            "answer": f"({LETTERS[choices.index(str(correct))]})",
            "prompt": render_prompt(question, choices),
            "task": str(row.get("question_type") or ""),
            "type": "",
            "source": "SAT",
        }

    def _from_cvbench(self, row: dict, index: int, where: str, base_dir: Path | None) -> dict:
        choices = [str(c) for c in _as_list(row.get("choices"))]
        answer = str(row.get("answer", "")).strip()
        match = re.fullmatch(r"\(?([A-Z])\)?", answer)
        if not choices or not match or LETTERS.find(match.group(1)) not in range(len(choices)):
            raise DataError(f"{where}: 'answer' {answer!r} must be a letter like '(A)' naming one of {choices!r}")
        image = row.get("image")
        if image is None and row.get("filename"):
            image = row["filename"]  # CV-Bench's test.jsonl names the file under img/ instead
        if image is None:
            raise DataError(f"{where}: no 'image' (or 'filename') field")
        if isinstance(image, str):
            image = resolve_image_ref(image, base_dir, where)
        question = _text(row, "question", where)
        return {
            "id": str(row["idx"] if row.get("idx") is not None else index),
            "images": [image],
            "question": question,
            "choices": choices,
            "answer": f"({match.group(1)})",
            "prompt": str(row.get("prompt") or render_prompt(question, choices)),
            "task": str(row.get("task") or ""),
            "type": str(row.get("type") or ""),
            "source": str(row.get("source") or ""),
        }

    # ---- prompt ----------------------------------------------------------------------------------
    def messages(self, example: dict) -> list[dict]:
        """Instruct: image(s), prompt, think/answer instruction. Base: R1 system turn, user turn, "<think>"."""
        images = [to_pil(value, where=self.origin(example)) for value in example["images"]]
        if self.prompt_style == "instruct":
            return self.conversation(images, f"{example['prompt']}\n{THINK_ANSWER_INSTRUCTION}")
        return self.conversation(images, example["prompt"])

    # ---- reward and metrics ------------------------------------------------------------------------
    def score(self, completion: str, example: dict) -> RewardOutput:
        text = self.full_completion(completion)
        fmt = float(format_ok(text))
        acc = float(match_choice(extract_answer(text), example["choices"]) == LETTERS.index(example["answer"][1]))
        return RewardOutput(fmt + acc, {"format": fmt, "accuracy": acc})

    def metrics(self, examples: Sequence[dict], completions: Sequence[str]) -> dict[str, float]:
        """Per-task accuracy (only tasks present), `Total` (micro-average), `lmms_eval_overall`, `format`."""
        if len(examples) != len(completions):
            raise ValueError(f"{len(examples)} examples but {len(completions)} completions")
        scores = [self.score(c, e).components for e, c in zip(examples, completions)]
        correct = [s["accuracy"] for s in scores]
        by_task = defaultdict(list)
        for example, ok in zip(examples, correct):
            by_task[example["task"]].append(ok)
        out = {task: _mean(by_task[task]) for task in CVBENCH_TASKS if by_task[task]}
        out["Total"] = _mean(correct)
        overall = lmms_eval_overall(examples, correct)
        if overall is not None:
            out["lmms_eval_overall"] = overall
        out["format"] = _mean([s["format"] for s in scores])
        return out

    def reference_answer(self, example: dict) -> str | None:
        return example["answer"]

    def record_fields(self, example: dict) -> dict[str, Any]:
        keys = ("id", "task", "type", "source", "question", "choices", "answer")
        return {k: example[k] for k in keys if k in example}


def lmms_eval_overall(examples: Sequence[dict], correct: Sequence[float]) -> float | None:
    """lmms-eval's CV-Bench score: the mean of the 2D and 3D accuracies, where each is the mean of its sources'
    accuracies. On CV-Bench that is ((ADE20K + COCO) / 2 + Omni3D) / 2, the formula in lmms-eval's
    `tasks/cv_bench/utils.py` (`cv_bench_default_aggregate_results`). None when no item has type 2D or 3D.
    """
    per_source = defaultdict(list)
    for example, ok in zip(examples, correct):
        if example.get("type") in ("2D", "3D"):
            per_source[(example["type"], example.get("source", ""))].append(ok)
    per_type = defaultdict(list)
    for (kind, _), values in per_source.items():
        per_type[kind].append(_mean(values))
    return _mean([_mean(v) for v in per_type.values()]) if per_type else None


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def _as_list(value: Any) -> list:
    """Lists as datasets, pandas (numpy arrays) and JSON give them; anything else is empty."""
    if hasattr(value, "tolist") and not isinstance(value, (bytes, str)):
        value = value.tolist()
    return list(value) if isinstance(value, (list, tuple)) else []


def _text(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: '{key}' must be a non-empty string, got {value!r}")
    return value.strip()
