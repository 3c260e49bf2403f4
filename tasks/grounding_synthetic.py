"""The offline twin of the grounding tasks: 2-4 flat shapes on a canvas, "find the red circle" and its box.

Canvas sides are not multiples of 28, so RefCOCO's resize-and-map-back is exercised. Each scene depends on
its random generator alone; `LisaTask`/`RefCOCOTask.synthetic` turn one into the task's own example form.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from gpg_vl_tasks._synthetic import BACKGROUND, draw_shape, png_bytes

SCENE_COLOURS = ("red", "green", "blue", "yellow", "purple")
SCENE_SHAPES = ("circle", "square", "triangle")


def draw_scene(rng: random.Random) -> dict:
    """2-4 shapes of distinct colour/shape pairs on an odd-sized canvas; the first one is the target.

    Returns PNG bytes, the size, the target's description ("the red circle") and its tight pixel box.
    """
    width, height = rng.randint(200, 320), rng.randint(160, 280)
    kinds = rng.sample([(c, s) for c in SCENE_COLOURS for s in SCENE_SHAPES], rng.randint(2, 4))
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    spots: list[tuple[int, int, int, int]] = []
    boxes = []
    for colour, shape in kinds:
        x1, y1, x2, y2 = _free_spot(rng, width, height, spots)
        spots.append((x1, y1, x2, y2))
        boxes.append(draw_shape(draw, shape, (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, colour))
    colour, shape = kinds[0]
    box = tuple(round(v, 1) for v in boxes[0])
    return {"image": png_bytes(image), "width": width, "height": height, "description": f"the {colour} {shape}", "box": box}


def _free_spot(rng: random.Random, width: int, height: int, taken: list) -> tuple[int, int, int, int]:
    """A square of side 30-70 px inside the canvas that overlaps no taken one (best effort after 200 tries)."""
    for _ in range(200):
        side = rng.randint(30, 70)
        x, y = rng.randint(0, width - side - 1), rng.randint(0, height - side - 1)
        box = (x, y, x + side, y + side)
        if all(box[2] <= t[0] or t[2] <= box[0] or box[3] <= t[1] or t[3] <= box[1] for t in taken):
            return box
    return box
