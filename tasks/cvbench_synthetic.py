"""The offline twin of CV-Bench: PIL-drawn spatial multiple choice in CV-Bench's row schema and categories.

Count (how many shapes of one kind), Relation (left/right or above/below), Depth (the nearer object is
drawn bigger, lower and on top) and Distance (which of two objects is closer to a reference). Every object
in an image has its own flat colour on a flat background, so a test can check each answer from the pixels.
Rows are deterministic in (seed, index) alone, so `synthetic:100` is a prefix of `synthetic:1000`.
"""

from __future__ import annotations

import math
import random

from PIL import Image, ImageDraw

from gpg_vl.parsing import LETTERS
from gpg_vl_tasks._synthetic import BACKGROUND, COLOURS, draw_shape

TASKS = ("Count", "Relation", "Depth", "Distance")
SHAPES = ("circle", "square", "triangle")


def render_prompt(question: str, choices: list[str]) -> str:
    """CV-Bench's own `prompt` layout: the question, then one lettered option a line."""
    options = "\n".join(f"({LETTERS[i]}) {choice}" for i, choice in enumerate(choices))
    return f"{question} Select from the following choices.\n{options}"


def _objects(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """n (colour, shape) pairs with distinct colours, so every object is findable by colour."""
    colours = rng.sample(sorted(COLOURS), n)
    return [(c, rng.choice(SHAPES)) for c in colours]


def _place(rng: random.Random, size: int, radii: list[float], accept) -> list[tuple[float, float]]:
    """Random centres inside the canvas for the given radii, redrawn until `accept(centres)` holds."""
    for _ in range(1000):
        centres = [(rng.uniform(r + 2, size - r - 2), rng.uniform(r + 2, size - r - 2)) for r in radii]
        if accept(centres):
            return centres
    raise RuntimeError("synthetic layout failed; the image size is too small for the constraints")


def _mc(rng: random.Random, question: str, choices: list[str], correct: str) -> dict:
    """Shuffled choices, CV-Bench's answer string "(X)" and prompt."""
    choices = list(choices)
    rng.shuffle(choices)
    return {
        "question": question,
        "choices": choices,
        "answer": f"({LETTERS[choices.index(correct)]})",
        "prompt": render_prompt(question, choices),
    }


def _count(rng: random.Random, draw: ImageDraw.ImageDraw, size: int, easy: bool = False) -> dict:
    # One shape per cell of a 4x4 grid keeps shapes apart, so connected components equal the count.
    # easy: 1-4 squares filling the quarters of the image in reading order (each covers its quarter's image
    # tokens), no distractors, the choices 1-4 in order (a twin the tiny model can learn in minutes).
    cell = size / 4
    (colour, shape), (d_colour, d_shape) = _objects(rng, 2)
    if easy:
        n, shape = rng.randint(1, 4), "square"
        for q in range(n):
            draw_shape(draw, shape, (q % 2 + 0.5) * size / 2, (q // 2 + 0.5) * size / 2, size * 0.23, colour)
        question, choices = f"How many {colour} {shape}s are in the image?", ["1", "2", "3", "4"]
        return {"question": question, "choices": choices, "answer": f"({LETTERS[n - 1]})", "prompt": render_prompt(question, choices)}
    n = rng.randint(1, 6)
    n_distract = rng.randint(0, 3)
    cells = rng.sample(range(16), n + n_distract)
    r = cell * 0.3
    for k, c in enumerate(cells):
        jitter = cell / 2 - r - 2
        cx = (c % 4 + 0.5) * cell + rng.uniform(-jitter, jitter)
        cy = (c // 4 + 0.5) * cell + rng.uniform(-jitter, jitter)
        if k < n:
            draw_shape(draw, shape, cx, cy, r, colour)
        else:
            draw_shape(draw, d_shape, cx, cy, r, d_colour)
    wrong = rng.sample([k for k in range(0, 8) if k != n], 3)
    question = f"How many {colour} {shape}s are in the image?"
    return _mc(rng, question, [str(k) for k in [n, *wrong]], str(n))


def _relation(rng: random.Random, draw: ImageDraw.ImageDraw, size: int) -> dict:
    (ca, sa), (cb, sb) = _objects(rng, 2)
    r = size * 0.09
    axis = rng.randrange(2)  # 0: x (left/right), 1: y (above/below)
    centres = _place(
        rng, size, [r, r],
        lambda c: abs(c[0][axis] - c[1][axis]) > size / 3 and math.dist(c[0], c[1]) > 2 * r + 4,
    )
    for (colour, shape), (cx, cy) in zip([(ca, sa), (cb, sb)], centres):
        draw_shape(draw, shape, cx, cy, r, colour)
    before = centres[0][axis] < centres[1][axis]
    options = ["left", "right"] if axis == 0 else ["above", "below"]
    a, b = f"{ca} {sa}", f"{cb} {sb}"
    question = (
        f"Considering the relative positions of the {a} and the {b} in the image provided, "
        f"where is the {a} located with respect to the {b}?"
    )
    return _mc(rng, question, options, options[0] if before else options[1])


def _depth(rng: random.Random, draw: ImageDraw.ImageDraw, size: int) -> dict:
    # Perspective cues only: the nearer object is bigger, lower in the frame and drawn last (occluding).
    (cn, sn), (cf, sf) = _objects(rng, 2)
    r_near, r_far = size * 0.14, size * 0.065
    (near, far) = _place(
        rng, size, [r_near, r_far],
        lambda c: c[0][1] > c[1][1] + size * 0.1 and math.dist(c[0], c[1]) > r_near + 0.5 * r_far,
    )
    draw_shape(draw, sf, *far, r_far, cf)
    draw_shape(draw, sn, *near, r_near, cn)
    names = [f"{cn} {sn}", f"{cf} {sf}"]
    order = rng.sample(names, 2)
    question = f"Which object is closer to the camera taking this photo, the {order[0]} or the {order[1]}?"
    return _mc(rng, question, names, names[0])


def _distance(rng: random.Random, draw: ImageDraw.ImageDraw, size: int) -> dict:
    (cr, sr), (cn, sn), (cf, sf) = _objects(rng, 3)
    r = size * 0.08

    def clear(c):
        ref, near, far = c
        apart = all(math.dist(p, q) > 2 * r + 4 for p, q in [(ref, near), (ref, far), (near, far)])
        return apart and math.dist(ref, near) < 0.55 * math.dist(ref, far)

    centres = _place(rng, size, [r, r, r], clear)
    for (colour, shape), (cx, cy) in zip([(cr, sr), (cn, sn), (cf, sf)], centres):
        draw_shape(draw, shape, cx, cy, r, colour)
    names = [f"{cn} {sn}", f"{cf} {sf}"]
    order = rng.sample(names, 2)
    question = (
        f"Estimate the distances between objects in this image. Which object is closer to the {cr} {sr}, "
        f"the {order[0]} or the {order[1]}?"
    )
    return _mc(rng, question, names, names[0])


_MAKERS = {"Count": _count, "Relation": _relation, "Depth": _depth, "Distance": _distance}


def _make_row(index: int, seed: int, image_size: int = 112, tasks: tuple[str, ...] = TASKS, easy: bool = False) -> dict:
    """Row `index` of the twin, in CV-Bench's schema; the tasks take turns so every split is balanced."""
    rng = random.Random(f"cvbench-synthetic:{seed}:{index}")
    task = tasks[index % len(tasks)]
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    maker = _MAKERS[task]
    fields = maker(rng, ImageDraw.Draw(image), image_size, easy=True) if easy and task == "Count" else maker(rng, ImageDraw.Draw(image), image_size)
    return {
        "idx": index,
        "type": "2D" if task in ("Count", "Relation") else "3D",
        "task": task,
        "image": image,
        "source": "synthetic",
        **fields,
    }


def make_rows(size: int, seed: int, image_size: int = 112, tasks=TASKS, easy: bool = False) -> list[dict]:
    """The first `size` rows of the twin for `seed`: the given CV-Bench tasks in turn; `easy` draws Count as
    1-4 squares filling the quarters, with no distractors and the choices 1-4 in order."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"cvbench synthetic tasks must be a non-empty subset of {list(TASKS)}, got {list(tasks)}")
    return [_make_row(i, seed, image_size, tuple(tasks), easy) for i in range(size)]
