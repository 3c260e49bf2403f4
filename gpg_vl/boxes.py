"""Box geometry for grounding tasks and the `iou`/`giou` rewards: parsing, clipping, IoU/GIoU, rescaling, metrics.

A box is a tuple (x1, y1, x2, y2) of floats. Parsers return the numbers as written (possibly inverted or
outside the image); `clip_box` turns them into a usable box or None, so a bad box scores 0 instead of
dividing by a zero or negative area.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from gpg_vl.task import Box

_NUM = r"(-?\d+(?:\.\d+)?)"
# Visual-RFT's LISA answer "(x1,y1),(x2,y2)"; Visual-RFT's own regex takes integers only, this one also
# takes decimals and a minus sign so that such answers reach clip_box rather than failing to parse.
_POINT_PAIR = re.compile(rf"\(\s*{_NUM}\s*,\s*{_NUM}\s*\)\s*,\s*\(\s*{_NUM}\s*,\s*{_NUM}\s*\)")
# VLM-R1's RefCOCO answer "[x1, y1, x2, y2]", bare or inside JSON such as {"bbox_2d": [...]}.
_LIST = re.compile(rf"\[\s*{_NUM}\s*,\s*{_NUM}\s*,\s*{_NUM}\s*,\s*{_NUM}\s*\]")



def parse_point_pair_box(text: str) -> Box | None:
    """The first `(x1,y1),(x2,y2)` in `text`, as written; None when there is none."""
    match = _POINT_PAIR.search(text)
    return _finite(match.groups()) if match else None


def parse_list_box(text: str) -> Box | None:
    """The first `[x1, y1, x2, y2]` in `text`, as written; None when there is none."""
    match = _LIST.search(text)
    return _finite(match.groups()) if match else None


def _finite(numbers: Sequence[str]) -> Box | None:
    values = tuple(float(n) for n in numbers)  # float("9" * 400) is inf, never an exception
    return values if all(math.isfinite(v) for v in values) else None  # type: ignore[return-value]


def clip_box(box: Box, width: float, height: float) -> Box | None:
    """The part of `box` inside [0, width] x [0, height]; None when inverted (x2 <= x1) or empty after clipping.

    An inverted box is a wrong answer, not a box to reorder: the model was asked for top-left then bottom-right.
    """
    x1, y1, x2, y2 = box
    if x2 <= x1 or y2 <= y1:
        return None
    x1, y1, x2, y2 = max(0.0, x1), max(0.0, y1), min(float(width), x2), min(float(height), y2)
    return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None


def _area(box: Box) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])


def _intersection_union(a: Box, b: Box) -> tuple[float, float]:
    inter_w = min(a[2], b[2]) - max(a[0], b[0])
    inter_h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, inter_w) * max(0.0, inter_h)
    return inter, _area(a) + _area(b) - inter


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two valid boxes, in [0, 1] (continuous coordinates, no +1 pixel)."""
    inter, union = _intersection_union(a, b)
    return inter / union if union > 0 else 0.0


def box_giou(a: Box, b: Box) -> float:
    """Generalised IoU (Rezatofighi et al. 2019): IoU minus the empty share of the enclosing box; in [-1, 1]."""
    inter, union = _intersection_union(a, b)
    iou = inter / union if union > 0 else 0.0
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return iou - (hull - union) / hull if hull > 0 else iou


def rescale_box(box: Box, from_size: tuple[float, float], to_size: tuple[float, float]) -> Box:
    """`box` given on an image of (width, height) `from_size`, in the pixels of one of size `to_size`."""
    sx, sy = to_size[0] / from_size[0], to_size[1] / from_size[1]
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def grounding_metrics(ious: Sequence[float]) -> dict[str, float]:
    """`mIoU` (mean IoU, failures given as 0) and `acc@0.5` (share with IoU > 0.5), both in [0, 1]."""
    if not ious:
        return {"mIoU": 0.0, "acc@0.5": 0.0}
    return {"mIoU": sum(ious) / len(ious), "acc@0.5": sum(iou > 0.5 for iou in ious) / len(ious)}


# ---- coordinate frames: in what numbers a model writes a box -----------------------------------------------
# thousandths: 0-1000 of the image's width and height (Qwen2-VL, Qwen3-VL); resized_pixels: pixels of the image
# at the size the processor fed the model (Qwen2.5-VL). Transformers' source says neither; the wording is
# QwenLM's (Qwen2-VL/Qwen-VL README: boxes "normalized in the range [0, 1000)"; Qwen3-VL blog and maintainers:
# "relative coordinates ranging from 0 to 1000" instead of Qwen2.5-VL's absolute ones). docs/tasks.md has the table.
BOX_FRAMES = ("thousandths", "resized_pixels")
NATIVE_BOX_FRAMES = {"qwen2_vl": "thousandths", "qwen2_5_vl": "resized_pixels", "qwen3_vl": "thousandths",
                     "qwen3_vl_moe": "thousandths"}  # fmt: skip
THOUSANDTHS = 1000.0


def frame_size(frame: str, resized_size: tuple[int, int] | None) -> tuple[float, float]:
    """(width, height) of `frame` for an image the model saw at `resized_size` (ImageBudget.resized_size)."""
    if frame == "thousandths":
        return THOUSANDTHS, THOUSANDTHS
    if frame == "resized_pixels":
        if resized_size is None:
            raise ValueError("a box in resized pixels needs the model's image budget (task.configure_images)")
        return float(resized_size[0]), float(resized_size[1])
    raise ValueError(f"box frame must be one of {BOX_FRAMES}, got {frame!r}")


def grounding_boxes(task, example: dict, completions: list[str], image_size: tuple[int, int]) -> dict:
    """For a grounding task (`gpg_vl.task.GroundingTask`): the true box (`truth_box`) and each completion's
    box (`boxes`, None where it gives none), in pixels of the original image of `image_size`, for the rollout
    inspector to draw; {} for any other task."""
    from gpg_vl.task import GroundingTask

    if not isinstance(task, GroundingTask) or "box" not in example:
        return {}
    scale = task.box_scale  # the frame of example["box"]: 0-N of the image, or None for its pixels

    def in_pixels(box: Box | None) -> list[float] | None:
        if box is None:
            return None
        box = rescale_box(box, (scale, scale), image_size) if scale else box
        return [round(float(v), 2) for v in box]

    return {"truth_box": in_pixels(tuple(example["box"])), "boxes": [in_pixels(task.predicted_box(c, example)) for c in completions]}
