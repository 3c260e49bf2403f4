"""Boxes for grounding tasks: read a predicted box from a completion, the ground truth from an example, draw both.

Everything is drawn on the ORIGINAL image, in its pixels. Trap: a model does not answer in those pixels.
LISA answers (and stores its truth) on a 0-1000 scale; RefCOCO answers in pixels of the resized image the
processor fed it (`ImageBudget.resized_size`), each unless `box_frame` says otherwise. A grounding task (`gpg_vl.task.GroundingTask`) maps the box itself, so
the box drawn is the box the reward scored; `model_to_pixels` is the fallback for other tasks.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

from gpg_vl.parsing import extract_answer
from gpg_vl.task import Box, GroundingTask

GT_KEYS = ("box", "bbox", "gt_box", "boxes", "solution")
GT_COLOR = (0, 160, 60)
PRED_COLORS = [(220, 30, 30), (30, 90, 230), (235, 130, 0), (150, 40, 190), (0, 150, 170), (200, 0, 120)]
MIN_DRAW_SIDE = 448  # small images are enlarged for drawing, so labels and lines stay legible

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def parse_box(text: str | None) -> Box | None:
    """The first four numbers of `text` as (x1, y1, x2, y2), sorted so x1 <= x2 and y1 <= y2; else None.

    Reads `[x1, y1, x2, y2]`, `(x1,y1),(x2,y2)` and `x1 y1 x2 y2` alike; never raises.
    """
    if not text:
        return None
    numbers = _NUMBER.findall(text[:2000])  # a box is near the start; bound the work on long strings
    if len(numbers) < 4:
        return None
    x1, y1, x2, y2 = (float(n) for n in numbers[:4])
    return (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))


def _as_box(value) -> Box | None:
    """A box from a ground-truth field: [x1, y1, x2, y2], a list of such (the first is the target), or text."""
    if isinstance(value, str):
        return parse_box(value)
    if isinstance(value, Sequence) and len(value) == 4 and all(isinstance(v, (int, float)) for v in value):
        return parse_box(" ".join(str(v) for v in value))
    if isinstance(value, Sequence) and value and isinstance(value[0], Sequence) and not isinstance(value[0], str):
        return _as_box(value[0])
    return None


def ground_truth_box(example: dict | None) -> Box | None:
    """The target box of an example in the task's frame (see `frame_to_pixels`), from the first of GT_KEYS."""
    if not example:
        return None
    for key in GT_KEYS:
        value = example.get(key)
        if value is None or (key == "solution" and isinstance(value, str)):
            continue  # a free-text solution (a number, a class name) holds no box
        box = _as_box(value)
        if box is not None:
            return box
    return None


def truth_in_pixels(task, example: dict | None, image_size: tuple[int, int]) -> Box | None:
    """The example's target box in original-image pixels, or None."""
    return frame_to_pixels(ground_truth_box(example), task, image_size)


def is_grounding(task, example: dict | None) -> bool:
    """Whether completions of this task are boxes worth drawing: a grounding task, or an example with a box."""
    return isinstance(task, GroundingTask) or ground_truth_box(example) is not None


def normalised_scale(task) -> float | None:
    """N when a grounding task's boxes are on a 0-N scale (LISA as Visual-RFT: 1000), else None (pixels)."""
    return task.box_scale if isinstance(task, GroundingTask) else None


def frame_to_pixels(box: Box | None, task, image_size: tuple[int, int]) -> Box | None:
    """A box in the task's frame (the frame of `example["box"]`) -> pixels of the original image (w, h)."""
    scale = normalised_scale(task)
    if box is None or scale is None:
        return box
    width, height = image_size
    return (box[0] * width / scale, box[1] * height / scale, box[2] * width / scale, box[3] * height / scale)


def model_to_pixels(box: Box, task, image_size: tuple[int, int]) -> Box:
    """For a task without its own mapping: a box as the model wrote it -> original-image pixels. A normalised
    task's box is scaled; otherwise it is taken to be in pixels of the resized image the model saw."""
    if normalised_scale(task) is not None:
        return frame_to_pixels(box, task, image_size)
    width, height = image_size
    if task.image_budget is None:
        raise ValueError("a box in resized pixels needs the checkpoint's image budget (task.configure_images)")
    seen_w, seen_h = task.image_budget.resized_size(width, height)  # the checkpoint's own grid factor
    sx, sy = width / seen_w, height / seen_h
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def predicted_box(task, completion: str, image: Image.Image, example: dict | None = None) -> Box | None:
    """The box a completion predicts, in original-image pixels; None when it gives none. Never raises.

    A grounding task reads and maps the box itself (`predicted_box(completion, example)`), so the box drawn
    is the box the reward scored.
    """
    try:
        if isinstance(task, GroundingTask):
            # an upload has no example: give the task what it needs to know the image
            example = example or {"id": "upload", "image": image, "width": image.width, "height": image.height}
            return frame_to_pixels(task.predicted_box(completion, example), task, image.size)
        answer = extract_answer(completion)
        box = parse_box(answer if answer is not None else completion)  # as the grounding rewards read it
        return model_to_pixels(box, task, image.size) if box is not None else None
    except Exception:  # a plugin's parser failing must not take the page down
        return None


def enlarged(image: Image.Image) -> tuple[Image.Image, float]:
    """An RGB copy at least MIN_DRAW_SIDE on its long side (pixels kept sharp), and the zoom applied."""
    image = image.convert("RGB")
    zoom = max(1.0, MIN_DRAW_SIDE / max(image.size))
    if zoom > 1.0:
        image = image.resize((round(image.width * zoom), round(image.height * zoom)), Image.NEAREST)
    return image, zoom


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def draw_boxes(image: Image.Image, boxes: Sequence[tuple[str, Box | None]], ground_truth: Box | None = None) -> Image.Image:
    """A copy of `image` with the ground truth (green) and each labelled predicted box drawn on it."""
    canvas, zoom = enlarged(image)
    draw = ImageDraw.Draw(canvas)
    font = _font(max(12, canvas.width // 40))
    line = max(2, canvas.width // 200)
    items = [("ground truth", ground_truth, GT_COLOR)] if ground_truth is not None else []
    items += [(label, box, PRED_COLORS[i % len(PRED_COLORS)]) for i, (label, box) in enumerate(boxes)]
    for label, box, color in items:
        if box is None:
            continue
        x1, y1, x2, y2 = (v * zoom for v in box)
        # clip to the canvas: a box partly outside the image is still drawn where it overlaps
        x1, x2 = (min(max(v, 0), canvas.width - 1) for v in (x1, x2))
        y1, y2 = (min(max(v, 0), canvas.height - 1) for v in (y1, y2))
        draw.rectangle((x1, y1, x2, y2), outline=color, width=line)
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        text_w, text_h = right - left + 6, bottom - top + 4
        text_y = y1 - text_h if y1 >= text_h else y1 + line  # above the box, or inside it at the top edge
        draw.rectangle((x1, text_y, x1 + text_w, text_y + text_h), fill=color)
        draw.text((x1 + 3 - left, text_y + 2 - top), label, fill=(255, 255, 255), font=font)
    return canvas
