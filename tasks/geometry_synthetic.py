"""The offline twin of GEOQA: drawn triangles with given angles or sides, GEOQA's wording and answer forms.

Three kinds: the third angle of a triangle, a base angle of an isosceles one, a right triangle's hypotenuse
(Pythagorean triples). Example i depends on (seed, i) alone; answers carry GEOQA's units (`70°`, `13cm`).
"""

from __future__ import annotations

import math
import random

from PIL import Image, ImageDraw, ImageFont

from gpg_vl_tasks._synthetic import png_bytes

_TRIPLES = ((3, 4, 5), (5, 12, 13), (8, 15, 17), (7, 24, 25), (6, 8, 10), (9, 12, 15))


def make_synthetic(size: int, seed: int, easy: bool = False) -> list[dict]:
    """`size` drawn triangle problems in GEOQA's style; example i depends only on (seed, i). `easy`: only the
    hypotenuse of the six base Pythagorean triples (six answers, read off the question's two sides)."""
    return [_synthetic_example(random.Random(seed * 1_000_003 + i), i, easy) for i in range(size)]


def _synthetic_example(rng: random.Random, index: int, easy: bool = False) -> dict:
    kind = "hypotenuse" if easy else rng.choice(("third_angle", "isosceles", "hypotenuse"))
    if kind == "third_angle":
        a, b = rng.randint(25, 95), rng.randint(25, 95)
        while a + b > 155:
            a, b = rng.randint(25, 95), rng.randint(25, 95)
        question = f"in triangle ABC, angle A = {a}.0, angle B = {b}.0, then the degree of angle C is ()"
        answer, points, labels = f"{180 - a - b}°", _triangle(a, b), {"A": f"{a}°", "B": f"{b}°"}
    elif kind == "isosceles":
        apex = rng.randrange(20, 141, 2)  # even, so the base angles are whole degrees
        question = f"in triangle ABC, AB = AC, angle A = {apex}.0, then the degree of angle B is ()"
        base = (180 - apex) // 2
        answer, points, labels = f"{base}°", _triangle(base, base, apex_name="A"), {"A": f"{apex}°"}
    else:
        k = 1 if easy else rng.randint(1, 3)
        ac, bc, ab = (k * n for n in rng.choice(_TRIPLES))
        question = f"in triangle ABC, angle C = 90.0, AC = {ac}.0, BC = {bc}.0, then the length of AB is ()"
        points = {"C": (0.0, 0.0), "A": (0.0, float(ac)), "B": (float(bc), 0.0)}
        answer, labels = f"{ab}cm", {"AC": str(ac), "BC": str(bc)}
    return {
        "id": f"synthetic-{index}",
        "image": _draw(points, labels),
        "question": f"As shown in the figure, {question}",  # GEOQA's opening
        "ground_truth": answer,
        "kind": kind,
    }


def _triangle(angle_a: float, angle_b: float, apex_name: str = "C") -> dict[str, tuple[float, float]]:
    """Vertices (y up) of a triangle with the given base angles on a unit base; the apex gets `apex_name`."""
    ra, rb = math.radians(angle_a), math.radians(angle_b)
    side = math.sin(rb) / math.sin(ra + rb)  # law of sines: the side from the first base vertex to the apex
    names = [n for n in "ABC" if n != apex_name]
    return {names[0]: (0.0, 0.0), names[1]: (1.0, 0.0), apex_name: (side * math.cos(ra), side * math.sin(ra))}


def _draw(points: dict[str, tuple[float, float]], labels: dict[str, str], size: int = 224) -> bytes:
    """PNG bytes of the triangle fitted into a square canvas, vertex names and the given values written on it."""
    xs, ys = [p[0] for p in points.values()], [p[1] for p in points.values()]
    scale = (size - 64) / max(max(xs) - min(xs), max(ys) - min(ys))
    pixel = {n: (32 + (x - min(xs)) * scale, size - 32 - (y - min(ys)) * scale) for n, (x, y) in points.items()}
    cx, cy = sum(p[0] for p in pixel.values()) / 3, sum(p[1] for p in pixel.values()) / 3
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=14)
    draw.polygon(list(pixel.values()), outline="black", width=2)
    for name, (x, y) in pixel.items():
        dx, dy = x - cx, y - cy  # vertex names go outside the triangle, given values inside
        norm = math.hypot(dx, dy) or 1.0
        draw.text((x + 14 * dx / norm, y + 14 * dy / norm), name, fill="black", font=font, anchor="mm")
        if name in labels:
            draw.text((x - 26 * dx / norm, y - 26 * dy / norm), labels[name], fill="blue", font=font, anchor="mm")
    for side, text in labels.items():
        if len(side) == 2:
            (x1, y1), (x2, y2) = pixel[side[0]], pixel[side[1]]
            draw.text(((x1 + x2) / 2 + 10, (y1 + y2) / 2 - 10), text, fill="blue", font=font, anchor="mm")
    return png_bytes(image)
