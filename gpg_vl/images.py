"""The one image-resize rule: Qwen2-VL's smart resize, applied before the processor everywhere.

`ImageBudget` is the one record of it: min and max pixels and the grid factor (28 for Qwen2/2.5-VL, 32 for
Qwen3-VL), built by the loaded processor (`VLProcessor.budget`) and handed to tasks, eval, the demo and vLLM,
so the image the policy is trained on is the image it is evaluated on, and a box on it maps back exactly.
"""

from __future__ import annotations

import math

from dataclasses import dataclass

from PIL import Image

# Qwen2-VL's own image-processor defaults: used only when neither the config nor the model folder says more.
QWEN_MIN_PIXELS = 56 * 56
QWEN_MAX_PIXELS = 28 * 28 * 1280
FACTOR = 28  # Qwen2/2.5-VL: patch 14 x spatial merge 2 (Qwen3-VL: 32); processors pass their own


def smart_resize(height: int, width: int, min_pixels: int, max_pixels: int, factor: int = FACTOR) -> tuple[int, int]:
    """(height, width) rounded to multiples of `factor`, area scaled into [min_pixels, max_pixels], aspect kept."""
    if min(height, width) <= 0:
        raise ValueError(f"image has an empty side: {width}x{height}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image aspect ratio over 200 is not supported: {width}x{height}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


@dataclass(frozen=True)
class ImageBudget:
    """The size every image is resized to before one model sees it (its processor builds it)."""

    min_pixels: int
    max_pixels: int
    factor: int  # pixels per side of one merged image token: patch x spatial merge
    native_box_frame: str | None = None  # the frame the model's family writes boxes in (gpg_vl.boxes); None: unknown

    def __post_init__(self) -> None:
        if not 0 < self.min_pixels <= self.max_pixels or self.factor < 1:
            raise ValueError(f"image budget needs 0 < min_pixels <= max_pixels and factor >= 1, got {self}")

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) the model sees an image of (width, height) at."""
        h, w = smart_resize(height, width, self.min_pixels, self.max_pixels, self.factor)
        return w, h


def check_usable(image: Image.Image) -> None:
    """A ValueError naming the problem when no budget can show `image` (an empty side, aspect ratio over 200)."""
    smart_resize(image.height, image.width, 1, 1 << 62)


def resize_for_model(image: Image.Image, min_pixels: int, max_pixels: int, factor: int = FACTOR) -> Image.Image:
    """The RGB image at the size the model sees it (no-op when already there)."""
    image = image.convert("RGB")
    h, w = smart_resize(image.height, image.width, min_pixels, max_pixels, factor)
    if (h, w) == (image.height, image.width):
        return image
    return image.resize((w, h), Image.BICUBIC)


def resize_messages(messages: list[dict], min_pixels: int, max_pixels: int, factor: int = FACTOR) -> list[dict]:
    """A copy of chat messages with every image resized by `resize_for_model`."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = [
                {**item, "image": resize_for_model(item["image"], min_pixels, max_pixels, factor)}
                if item.get("type") == "image"
                else item
                for item in content
            ]
        out.append({**message, "content": content})
    return out


def message_images(messages: list[dict]) -> list[Image.Image]:
    """The images of chat messages in order of appearance."""
    return [
        item["image"]
        for message in messages
        if isinstance(message.get("content"), list)
        for item in message["content"]
        if item.get("type") == "image"
    ]
