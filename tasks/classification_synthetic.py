"""The offline twin of few-shot classification: one drawn shape an image, the class "<colour> <shape>".

Twelve classes (four colours, three shapes), balanced by index; example i depends on (seed, i) alone. The
shape covers a known share of its bounding box (square 1, circle pi/4, triangle 1/2), so a test can check
each label against the pixels.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from gpg_vl_tasks._synthetic import draw_shape

QUESTION = "This is an image containing a shape. Please identify the colour and kind of the shape based on the image."
CLASS_COLOURS = ("red", "green", "blue", "yellow")
CLASS_SHAPES = ("circle", "square", "triangle")
CLASSES = [f"{c} {s}" for c in CLASS_COLOURS for s in CLASS_SHAPES]
# easy: four classes, one colour each, so the colour alone names the class (what the tiny model learns in minutes)
EASY_CLASSES = ["red circle", "green square", "blue triangle", "yellow square"]


def make_synthetic_examples(size: int, seed: int, image_size: int = 112, split: str = "synthetic", easy: bool = False) -> list[dict]:
    """`size` images of one drawn object each, in the task's example form; the classes take turns."""
    classes = EASY_CLASSES if easy else CLASSES
    examples = []
    for i in range(size):
        rng = random.Random(f"classification-synthetic:{seed}:{i}")
        label = classes[i % len(classes)]
        examples.append(
            {"id": f"synthetic-{split}-{i}", "image": _draw(rng, label, image_size), "label": label,
             "question": QUESTION, "problem": None, "dataset": "synthetic"}
        )
    return examples


def _draw(rng: random.Random, label: str, size: int) -> Image.Image:
    colour, shape = label.split()
    shade = rng.randint(225, 250)  # background varies so images differ beyond position and size
    image = Image.new("RGB", (size, size), (shade, shade, shade))
    r = rng.uniform(0.2, 0.32) * size
    cx, cy = (rng.uniform(r + 2, size - r - 2) for _ in range(2))
    draw_shape(ImageDraw.Draw(image), shape, cx, cy, r, colour)
    return image
