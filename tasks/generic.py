"""`generic`: any image + question + answer data, rewarded by names in the config instead of a Task subclass.

Rows come from a hub id, a parquet/JSONL/JSON file or folder (`gpg_vl.data`), or `synthetic[:N]`; the
image, question and answer columns are task options. `rewards: {format: 0.5, choice: 1.0}` picks library
rewards or `file.py:function` ones (`gpg_vl.rewards`); the total is their weighted sum and each is logged
as its own component. Docs: docs/generic.md.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gpg_vl.errors import ConfigError
from gpg_vl.data import DataError, data_folder, read_records, resolve_image_ref, synthetic_spec, to_pil
from gpg_vl.parsing import LETTERS, THINK_ANSWER_INSTRUCTION
from gpg_vl.rewards import Target, accuracy_component, build_rewards, combine, score_batch
from gpg_vl.task import RewardOutput, Task
from gpg_vl_tasks.shapes import COLORS, SHAPES, draw_image

PROMPT_STYLES = ("instruct", "base")
DEFAULT_REWARDS = {"format": 1.0, "exact": 1.0}
PLACEHOLDER = "{question}"
SYNTHETIC_QUESTION = "What colour is the shape in the image?"


class GenericTask(Task):
    name = "generic"
    description = "Your image/question/answer data, rewards named in the config (format, choice, math, iou, file.py:fn, ...)"

    def __init__(
        self,
        image_column: str = "image",
        question_column: str = "problem",
        answer_column: str = "solution",
        prompt: str | None = None,
        prompt_style: str = "instruct",
        rewards: Mapping[str, float] | None = None,
        synthetic_image_size: int = 112,
        **options: Any,
    ) -> None:
        """image_column: one image, a list of images, bytes or paths (relative to the data file).
        question_column / answer_column: the question text and the answer the rewards compare with.
        prompt: template with a `{question}` placeholder (default: the question, then the think/answer
        instruction for instruct). prompt_style: instruct | base. rewards: {name: weight}, see
        gpg_vl.rewards. synthetic_image_size: side in pixels of the `synthetic` twin's images."""
        super().__init__(**options)
        for option, column in (("image_column", image_column), ("question_column", question_column),
                               ("answer_column", answer_column)):  # fmt: skip
            if not isinstance(column, str) or not column:
                raise ConfigError(f"task.options.{option} must be a column name, got {column!r}", "task.options")
        if prompt_style not in PROMPT_STYLES:
            raise ConfigError(f"task.options.prompt_style must be one of {PROMPT_STYLES}, got {prompt_style!r}", "task.options")
        if prompt is not None and (not isinstance(prompt, str) or PLACEHOLDER not in prompt):
            raise ConfigError(f"task.options.prompt must be text holding the placeholder {PLACEHOLDER}, got {prompt!r}", "task.options")
        self.image_column, self.question_column, self.answer_column = image_column, question_column, answer_column
        self.prompt, self.prompt_style = prompt, prompt_style
        self.rewards = build_rewards(DEFAULT_REWARDS if rewards is None else rewards)
        self.synthetic_image_size = int(synthetic_image_size)

    # ---- data ------------------------------------------------------------------------------------
    def load(self, path: str | None = None, split: str = "train") -> list[dict]:
        """Examples from a hub id, a local parquet/JSONL/JSON file or folder, or `synthetic[:N]`."""
        if path is None:
            key = "train_data" if split.partition("[")[0] == "train" else "eval_data"
            raise DataError(
                f"generic has no default data: set task.{key} to a hub id, a parquet/JSONL/JSON file or folder, "
                "or synthetic:N" + ("" if key == "train_data" else " (or eval.at_end=false eval.every=0)"))
        spec = synthetic_spec(path, split)
        if spec is not None:
            rows, base_dir = self._synthetic_rows(*spec, split), None
        else:
            folder = data_folder(path)  # made absolute so a later chdir cannot break the image paths
            rows, base_dir = read_records(path, split), str(Path(folder).resolve()) if folder else None
        examples = [self._example(row, i, base_dir, f"{path} (split {split!r}) row {i}") for i, row in enumerate(rows)]
        if not examples:
            raise DataError(f"{path} (split {split!r}): no rows")
        return examples

    def _example(self, row: Any, index: int, base_dir: str | None, where: str) -> dict:
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a record, got {type(row).__name__}")
        for option in ("image_column", "question_column", "answer_column"):
            column = getattr(self, option)
            if row.get(column) is None:
                raise DataError(
                    f"{where}: no column {column!r} (columns: {', '.join(map(str, row)) or 'none'}); "
                    f"name the right one with task.options.{option}")
        if "completions" in row and any(r.function is not None for r in self.rewards):
            raise DataError(f"{where}: a column named 'completions' would clash with the reward functions' argument")
        refs = row[self.image_column] if isinstance(row[self.image_column], (list, tuple)) else [row[self.image_column]]
        if not refs:
            raise DataError(f"{where}: column {self.image_column!r} holds an empty list of images")
        images = [resolve_image_ref(ref, base_dir, f"{where} column {self.image_column!r}") for ref in refs]
        question = row[self.question_column]
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{where}: column {self.question_column!r} must be non-empty text, got {question!r}")
        choices = row.get("choices")
        if choices is not None and not (isinstance(choices, (list, tuple)) and choices and
                                        all(isinstance(c, (str, int, float)) for c in choices)):  # fmt: skip
            raise DataError(f"{where}: column 'choices' must be a non-empty list of option texts, got {choices!r}")
        example = {
            "id": str(row.get("id", index)),
            "images": images,
            "question": question.strip(),
            "answer": row[self.answer_column],
            "choices": [str(c) for c in choices] if choices else None,
            "row": row,  # every column, for reward functions
        }
        target = _target(example)
        for reward in self.rewards:
            if reward.library is not None:
                try:
                    reward.library.gold(target)
                except ValueError as e:
                    raise DataError(f"{where}: reward {reward.name!r} cannot use column {self.answer_column!r}: {e}") from None
        return example

    def _synthetic_rows(self, size: int, seed: int, split: str) -> list[dict]:
        """The offline twin: the colour of one large shape, lettered options in the question and a `choices`
        column, the colour name as the answer (so choice, exact and contains all apply)."""
        options = "\n".join(f"({LETTERS[i]}) {name}" for i, name in enumerate(COLORS))
        rows = []
        for i in range(size):
            rng = random.Random(f"generic-synthetic:{seed}:{i}")  # row i depends on (seed, i) alone
            colour, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
            rows.append({
                "id": f"synthetic-{split}-{i}",
                self.image_column: draw_image(shape, colour, self.synthetic_image_size, rng),
                self.question_column: f"{SYNTHETIC_QUESTION}\n{options}",
                self.answer_column: colour,
                "choices": list(COLORS),
            })
        return rows

    # ---- prompt ----------------------------------------------------------------------------------
    def prompt_text(self, example: dict) -> str:
        """The user text: the template with the question put in (str.replace, so other braces stay as written)."""
        default = f"{PLACEHOLDER}\n{THINK_ANSWER_INSTRUCTION}" if self.prompt_style == "instruct" else PLACEHOLDER
        return (self.prompt or default).replace(PLACEHOLDER, example["question"])

    def messages(self, example: dict) -> list[dict]:
        where = f"example {example.get('id')}"
        return self.conversation([to_pil(ref, where=where) for ref in example["images"]], self.prompt_text(example))

    # ---- reward and metrics ----------------------------------------------------------------------
    def score(self, completion: str, example: dict) -> RewardOutput:
        """The weighted sum of the configured rewards. Reward functions are called with lists of length 1:
        the trainer scores one completion at a time."""
        (components,) = score_batch(self.rewards, [self.full_completion(completion)], [_target(example)], [example["row"]])
        return combine(self.rewards, components)

    def metrics(self, examples: Sequence[dict], completions: Sequence[str]) -> dict[str, float]:
        """The mean of each reward component, and `accuracy` (the first correctness reward's mean) if any.
        Reward functions see all the completions in one call here."""
        if len(examples) != len(completions):
            raise ValueError(f"{len(examples)} examples but {len(completions)} completions")
        if not examples:
            return {}
        texts = [self.full_completion(c) for c in completions]
        scores = score_batch(self.rewards, texts, [_target(e) for e in examples], [e["row"] for e in examples])
        out = {r.name: sum(s[r.name] for s in scores) / len(scores) for r in self.rewards}
        correct = accuracy_component(self.rewards)
        if correct is not None:
            out["accuracy"] = out[correct]
        return out

    def record_fields(self, example: dict) -> dict[str, Any]:
        fields = {"id": example["id"], "question": example["question"]}
        answer = example["answer"]
        if isinstance(answer, (str, int, float)) or (isinstance(answer, list) and all(isinstance(x, (int, float, str)) for x in answer)):
            fields["answer"] = answer
        if example["choices"]:
            fields["choices"] = example["choices"]
        return fields


def _target(example: dict) -> Target:
    choices = example.get("choices")
    return Target(example["answer"], example["question"], tuple(choices) if choices else None)
