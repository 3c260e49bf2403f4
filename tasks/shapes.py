"""`shapes`: the built-in synthetic task. One large PIL-drawn shape; "what colour (or shape) is it?"

CV-Bench style: the question, lettered choices in a fixed order, an answer like `(B)`. Deterministic by
seed, no download, learnable by the tiny CPU model in minutes: it is what the quickstart and tests train on.
Data paths: `synthetic` (1000 examples) or `synthetic:N`; the split name seeds the generator.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from PIL import Image, ImageDraw

from gpg_vl.data import DataError, synthetic_spec
from gpg_vl.parsing import LETTERS, THINK_ANSWER_INSTRUCTION, extract_answer, format_ok, match_choice
from gpg_vl.task import RewardOutput, Task
from gpg_vl_tasks._synthetic import BACKGROUND, COLOURS, SHAPES, draw_shape

COLORS = {name: COLOURS[name] for name in ("red", "green", "blue", "yellow")}  # the four colours it asks about
QUESTIONS = {"color": "What colour is the shape in the image?", "shape": "What shape is in the image?"}


def draw_image(shape: str, colour: str, size: int, rng: random.Random) -> Image.Image:
    """A `size`x`size` image with one large shape (60-90% of the image across) at a random place."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    side = int(size * rng.uniform(0.6, 0.9))
    x0, y0 = rng.randint(0, size - side), rng.randint(0, size - side)
    draw_shape(ImageDraw.Draw(image), shape, x0 + side / 2, y0 + side / 2, side / 2, colour)
    return image


class ShapesTask(Task):
    """Options: questions (list of "color"/"shape"), image_size (px), prompt_style (instruct|base)."""

    name = "shapes"
    description = "Synthetic: the colour or shape of one large drawn shape, 4 lettered choices (offline, quickstart)"
    default_train_data = "synthetic:2000"
    default_eval_data = "synthetic:200"

    def __init__(self, questions: Sequence[str] = ("color",), image_size: int = 112, prompt_style: str = "instruct"):
        super().__init__(prompt_style=prompt_style)
        unknown = set(questions) - set(QUESTIONS)
        if unknown or not questions:
            raise ValueError(f"shapes: questions must be a non-empty subset of {sorted(QUESTIONS)}, got {list(questions)}")
        self.questions, self.image_size = list(questions), int(image_size)

    def load(self, path: str | None = None, split: str = "train") -> list[dict]:
        path = self.data_path(path, split)
        spec = synthetic_spec(path, split)
        if spec is None:
            raise DataError(f"shapes is synthetic only: use data 'synthetic' or 'synthetic:N', not {path!r}")
        size, seed = spec
        rng = random.Random(seed)
        return [self._make_example(rng, f"{split}-{i}") for i in range(size)]

    def _make_example(self, rng: random.Random, example_id: str) -> dict:
        kind = rng.choice(self.questions)
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        choices = list(COLORS) if kind == "color" else list(SHAPES)  # fixed order: the letter carries no hint
        truth = color if kind == "color" else shape
        return {
            "id": example_id,
            "image": draw_image(shape, color, self.image_size, rng),
            "question": QUESTIONS[kind],
            "choices": choices,
            "answer": f"({LETTERS[choices.index(truth)]})",
            "category": kind,
        }

    def prompt_text(self, example: dict) -> str:
        options = "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(example["choices"]))
        return f"{example['question']}\n{options}"

    def messages(self, example: dict) -> list[dict]:
        if self.prompt_style == "base":
            return self.conversation([example["image"]], self.prompt_text(example))
        return self.conversation([example["image"]], f"{self.prompt_text(example)}\n{THINK_ANSWER_INSTRUCTION}")

    def answers_right(self, completion: str, example: dict) -> bool:
        answer = extract_answer(self.full_completion(completion))
        truth = LETTERS.index(example["answer"].strip("()"))
        return answer is not None and match_choice(answer, example["choices"]) == truth

    def score(self, completion: str, example: dict) -> RewardOutput:
        fmt = float(format_ok(self.full_completion(completion)))
        acc = float(self.answers_right(completion, example))
        return RewardOutput(total=fmt + acc, components={"format": fmt, "accuracy": acc})

    def metrics(self, examples: Sequence[dict], completions: Sequence[str]) -> dict[str, float]:
        if len(examples) != len(completions):
            raise ValueError(f"{len(examples)} examples but {len(completions)} completions")
        if not examples:
            return {}
        hits = [self.answers_right(c, e) for e, c in zip(examples, completions)]
        out = {"accuracy": sum(hits) / len(hits)}
        out["format"] = sum(format_ok(self.full_completion(c)) for c in completions) / len(completions)
        for kind in sorted({e["category"] for e in examples}):
            picked = [h for h, e in zip(hits, examples) if e["category"] == kind]
            out[f"accuracy/{kind}"] = sum(picked) / len(picked)
        return out

    def reference_answer(self, example: dict) -> str | None:
        return example["answer"]

    def warmup_answer(self, examples: Sequence[dict], rng) -> str:
        # a uniform letter, whatever the data's answers are: builtin:tiny-warm was built this way
        return f"({rng.choice('ABCD')})"
