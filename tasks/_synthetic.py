"""The kit the offline twins draw with: one palette, one shape drawer, PNG bytes.

Every twin (shapes, cvbench, lisa/refcoco, classification) paints flat colours from `COLOURS` on a flat
background with no anti-aliasing, so a test can check each answer against the pixels.
"""

from __future__ import annotations

import io
import math

from PIL import Image, ImageDraw

from gpg_vl.task import Box

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
    "purple": (140, 60, 180),
    "orange": (240, 120, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
BACKGROUND = (240, 240, 240)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour: str) -> Box:
    """A filled `shape` of colour `colour` around (cx, cy); returns its tight box (x1, y1, x2, y2).

    Circle, triangle (apex up) and diamond are inscribed in the circle of radius r, so their area centroid
    is (cx, cy); the square's side is 2r.
    """
    fill = COLOURS[colour]
    if shape == "circle":
        box = (cx - r, cy - r, cx + r, cy + r)
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        box = (cx - r, cy - r, cx + r, cy + r)
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        h = r * math.sqrt(3) / 2
        box = (cx - h, cy - r, cx + h, cy + r / 2)
        draw.polygon([(cx, cy - r), (cx - h, cy + r / 2), (cx + h, cy + r / 2)], fill=fill)
    elif shape == "diamond":
        box = (cx - r, cy - r, cx + r, cy + r)
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return box


def png_bytes(image: Image.Image) -> bytes:
    """The image as PNG bytes (fast compression: twins make thousands)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
