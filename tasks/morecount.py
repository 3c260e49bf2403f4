"""`morecount`: the two-image twin. Two drawn images per prompt, answered (A) the first or (B) the second.

Two questions (option `question`), chance 0.5 for both:
- `count` (default), "which image shows more shapes?": each image holds 1 to `max_shapes` small shapes on a
  grid (no overlap) and the two counts always differ, so no single image answers it: the policy has to
  compare both. The tiny model has not learnt it (docs/learning.md).
- `colour`, "which image shows a red shape?": each image holds one large shape, red in exactly one of them.
  Either image alone answers it, but only through its pixels; the tiny model learns it (docs/learning.md).
Both exercise every multi-image path (HF rollout, shared-prefix forward, eval and its controls, the
inspector, vLLM with `rollout.vllm_max_images_per_prompt: 2`). Data: `synthetic` (1000 examples) or
`synthetic:N`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from PIL import Image, ImageDraw

from gpg_vl.data import DataError, synthetic_spec
from gpg_vl.parsing import THINK_ANSWER_INSTRUCTION, extract_answer, match_choice
from gpg_vl.task import Task
from gpg_vl_tasks._synthetic import BACKGROUND, COLOURS, SHAPES, draw_shape
from gpg_vl_tasks.shapes import ShapesTask

QUESTIONS = {"count": "Which image shows more shapes?", "colour": "Which image shows a red shape?"}
TARGET = "red"  # the colour the `colour` question asks for
OTHERS = ("green", "blue", "yellow")  # the other image's colour: the quickstart's palette, nothing close to red
CHOICES = ["the first image", "the second image"]
GRID = 2  # a 2x2 grid of cells, one shape at most per cell: up to 4 shapes, each clearly apart


def draw_count(count: int, size: int, rng: random.Random) -> Image.Image:
    """A `size`x`size` image with `count` shapes of random kinds and colours in distinct grid cells."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = size / GRID
    for index in rng.sample(range(GRID * GRID), count):
        cx, cy = (index % GRID + 0.5) * cell, (index // GRID + 0.5) * cell
        draw_shape(draw, rng.choice(SHAPES), cx, cy, cell * rng.uniform(0.25, 0.4), rng.choice(list(COLOURS)))
    return image


def draw_one(colour: str, size: int, rng: random.Random) -> Image.Image:
    """A `size`x`size` image with one large shape of `colour` near its centre."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    cx, cy = (size * rng.uniform(0.42, 0.58) for _ in range(2))
    draw_shape(ImageDraw.Draw(image), rng.choice(SHAPES), cx, cy, size * rng.uniform(0.3, 0.42), colour)
    return image


class MoreCountTask(Task):
    """Options: question (count|colour), image_size (px per image), max_shapes (2..4, count), prompt_style."""

    name = "morecount"
    description = "Synthetic two-image twin: which of two images shows more shapes (or a red one), (A) or (B) (offline)"
    default_train_data = "synthetic:2000"
    default_eval_data = "synthetic:200"

    def __init__(self, question: str = "count", image_size: int = 56, max_shapes: int = GRID * GRID, prompt_style: str = "instruct"):
        super().__init__(prompt_style=prompt_style)
        if question not in QUESTIONS:
            raise ValueError(f"morecount: question must be one of {', '.join(QUESTIONS)}, got {question!r}")
        if not 2 <= int(max_shapes) <= GRID * GRID:
            raise ValueError(f"morecount: max_shapes must be in [2, {GRID * GRID}], got {max_shapes}")
        self.question, self.image_size, self.max_shapes = question, int(image_size), int(max_shapes)

    def load(self, path: str | None = None, split: str = "train") -> list[dict]:
        spec = synthetic_spec(self.data_path(path, split), split)  # (size, seed); None for anything else
        if spec is None:
            raise DataError(f"morecount is synthetic only: use data 'synthetic' or 'synthetic:N', not {path!r}")
        rng = random.Random(spec[1])
        return [self.draw_example(rng, f"{split}-{i}") for i in range(spec[0])]

    def draw_example(self, rng: random.Random, example_id: str) -> dict:
        if self.question == "colour":
            first = rng.random() < 0.5  # which image gets the red shape
            other = rng.choice(OTHERS)
            colours = [TARGET, other] if first else [other, TARGET]
            images = [draw_one(c, self.image_size, rng) for c in colours]
            return {"id": example_id, "images": images, "colours": colours, "answer": "(A)" if first else "(B)"}
        counts = rng.sample(range(1, self.max_shapes + 1), 2)  # two different counts
        images = [draw_count(c, self.image_size, rng) for c in counts]
        return {"id": example_id, "images": images, "counts": counts, "answer": "(A)" if counts[0] > counts[1] else "(B)"}

    def prompt_text(self, example: dict) -> str:
        return f"{QUESTIONS[self.question]}\n(A) {CHOICES[0]}\n(B) {CHOICES[1]}"

    def messages(self, example: dict) -> list[dict]:
        text = self.prompt_text(example)
        return self.conversation(list(example["images"]), text if self.prompt_style == "base" else f"{text}\n{THINK_ANSWER_INSTRUCTION}")

    def answers_right(self, completion: str, example: dict) -> bool:
        answer = extract_answer(self.full_completion(completion))
        return answer is not None and match_choice(answer, CHOICES) == "AB".index(example["answer"][1])

    # format + accuracy, exactly as the quickstart's task scores its lettered choices
    score = ShapesTask.score

    def metrics(self, examples: Sequence[dict], completions: Sequence[str]) -> dict[str, float]:
        """`accuracy` and `format`: the means of the reward's two components."""
        if len(examples) != len(completions):
            raise ValueError(f"{len(examples)} examples but {len(completions)} completions")
        parts = [self.score(c, e).components for e, c in zip(examples, completions)]
        return {key: sum(p[key] for p in parts) / len(parts) for key in ("accuracy", "format")} if parts else {}

    def reference_answer(self, example: dict) -> str | None:
        return example["answer"]

    def warmup_answer(self, examples: Sequence[dict], rng) -> str:
        return f"({rng.choice('AB')})"  # a uniform letter: the warm-up teaches the form, not the answer
