"""The offline twin of the grounding tasks: 2-4 flat shapes on a canvas, "find the red circle" and its box.

Canvas sides are not multiples of 28, so RefCOCO's resize-and-map-back is exercised. Each scene depends on
its random generator alone; `LisaTask`/`RefCOCOTask.synthetic` turn one into the task's own example form.

The easy drawing (`synthetic_easy`) is one square in the top-left corner of a square canvas, its side a
quarter or three quarters of the canvas: at the twins' 112x112 pixels, 1 or 9 whole image tokens. It
varies the extent, not the place, of the target, and offers two boxes, not more, because the tiny model
could not learn the harder drawings (docs/learning.md): it barely tells image positions apart, and with
three nested sizes it settled on the middle one, the best guess without reading the image.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from gpg_vl_tasks._synthetic import BACKGROUND, draw_shape, png_bytes

SCENE_COLOURS = ("red", "green", "blue", "yellow", "purple")
SCENE_SHAPES = ("circle", "square", "triangle")
EASY_SIDES = (0.25, 0.75)  # of the canvas side: boxes (0,0)-(250,250) and (0,0)-(750,750), IoU 1/9 to each other


def draw_scene(rng: random.Random, easy: bool = False) -> dict:
    """2-4 shapes of distinct colour/shape pairs on an odd-sized canvas; the first one is the target.
    `easy`: the target alone, a square in the top-left corner of a square canvas, its side one of EASY_SIDES.

    Returns PNG bytes, the size, the target's description ("the red circle") and its tight pixel box.
    """
    if easy:
        return _easy_scene(rng)
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


def _easy_scene(rng: random.Random) -> dict:
    side = rng.randint(200, 320)
    colour, extent = rng.choice(SCENE_COLOURS), rng.choice(EASY_SIDES) * side
    image = Image.new("RGB", (side, side), BACKGROUND)
    box = draw_shape(ImageDraw.Draw(image), "square", extent / 2, extent / 2, extent / 2, colour)
    box = tuple(round(v, 1) for v in box)
    return {"image": png_bytes(image), "width": side, "height": side, "description": f"the {colour} square", "box": box}


def _free_spot(rng: random.Random, width: int, height: int, taken: list) -> tuple[int, int, int, int]:
    """A square of side 30-70 px inside the canvas that overlaps no taken one (best effort after 200 tries)."""
    for _ in range(200):
        side = rng.randint(30, 70)
        x, y = rng.randint(0, width - side - 1), rng.randint(0, height - side - 1)
        box = (x, y, x + side, y + side)
        if all(box[2] <= t[0] or t[2] <= box[0] or box[3] <= t[1] or t[3] <= box[1] for t in taken):
            return box
    return box
