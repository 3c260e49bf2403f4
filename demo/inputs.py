"""What the demo feeds the checkpoints: a task example, or an uploaded image with a typed question.

Uploads are untrusted: `read_upload` checks the file size and the image's sides BEFORE decoding the pixels
(PIL reads only the header on open), and `check_question` bounds the typed question, so a huge or malformed
input becomes an `UploadError` message, not a stalled server.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from PIL import Image

from gpg_vl.images import message_images
from gpg_vl.parsing import THINK_ANSWER_INSTRUCTION

MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_UPLOAD_SIDE = 4096
MAX_QUESTION_CHARS = 2000  # a typed question longer than this is refused (see check_question)
PROMPT_STYLES = ("instruct", "base")

# Ground-truth fields shown beside an example, in this order when present.
TRUTH_KEYS = ("answer", "ground_truth", "solution", "label", "correct_answer", "box", "boxes", "bbox")


class UploadError(ValueError):
    """An upload the demo refuses (too large, not an image); its text is shown in the page."""


@dataclass
class Prompt:
    """One input of a comparison: chat messages with the image inside, and the example when it has truth."""

    messages: list[dict]
    image: Image.Image  # the original image, before the model's resize
    example: dict | None = None  # None for an uploaded image: there is no ground truth to score against


def read_upload(path: str | os.PathLike | None) -> Image.Image:
    """The uploaded file as an RGB image; UploadError with a readable reason otherwise."""
    if not path:
        raise UploadError("Upload an image first.")
    try:
        size = os.path.getsize(path)
    except OSError:
        raise UploadError("The upload could not be read; please upload it again.") from None
    if size > MAX_UPLOAD_BYTES:
        raise UploadError(f"The file is {size / 2**20:.1f} MB; the demo accepts images up to {MAX_UPLOAD_BYTES // 2**20} MB.")
    try:
        with Image.open(path) as image:
            width, height = image.size
            if max(width, height) > MAX_UPLOAD_SIDE:
                raise UploadError(f"The image is {width}x{height} px; the demo accepts sides up to {MAX_UPLOAD_SIDE} px.")
            image.load()
            return image.convert("RGB")
    except UploadError:
        raise
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, DecompressionBombError, SyntaxError
        raise UploadError(f"This file is not an image the demo can read ({type(e).__name__}).") from None


def check_question(question: str | None) -> str:
    """The typed question, stripped; UploadError when it is empty or longer than MAX_QUESTION_CHARS.

    The bound is enforced here, on the server: the page's text box has the same limit, but an API client
    can send anything, and one 400 KiB question once held the (one-at-a-time) comparison queue for minutes.
    """
    question = (question or "").strip()
    if not question:
        raise UploadError("Type a question about the image.")
    if len(question) > MAX_QUESTION_CHARS:
        raise UploadError(f"The question is {len(question):,} characters; the demo accepts at most {MAX_QUESTION_CHARS:,}.")
    return question


def upload_prompt(image: Image.Image, question: str, task) -> Prompt:
    """Messages for a typed question about an uploaded image, built by the task's own `conversation`, so the
    prompt has the form (instruct, or base with R1's system turn and an opened "<think>") the task trains on.

    An instruct prompt gets the think/answer instruction appended, as the built-in tasks do. A grounding task
    (one with `parse_box`) renders its own prompt around the text, taken as the instruction or referring
    expression, so the model is asked for a box in the form it was trained on.
    """
    question = check_question(question)
    if callable(getattr(task, "parse_box", None)):
        pseudo = {"id": "upload", "image": image, "instruction": question, "problem": question, "question": question,
                  "width": image.width, "height": image.height}
        try:
            return Prompt(task.messages(pseudo), image, None)
        except Exception:  # the task needs fields an upload cannot give: use the generic prompt
            pass
    text = f"{question}\n{THINK_ANSWER_INSTRUCTION}" if task.prompt_style == "instruct" else question
    return Prompt(task.conversation([image], text), image, None)


def example_prompt(task, example: dict) -> Prompt:
    """The task's own messages for an example (its first image is the one shown and drawn on)."""
    messages = task.messages(example)
    images = message_images(messages)
    if not images:
        raise UploadError("This example has no image.")
    return Prompt(messages, images[0], example)


def prompt_text(messages: list[dict]) -> str:
    """The text the user turn(s) carry, images left out."""
    parts = []
    for message in messages:
        if message["role"] != "user":
            continue
        content = message["content"]
        if isinstance(content, str):
            parts.append(content)
        else:
            parts += [item["text"] for item in content if item.get("type") == "text"]
    return "\n".join(parts)


def ground_truth_text(example: dict) -> str:
    """The example's ground-truth fields as `key: value` lines (empty when it has none)."""
    lines = []
    for key in TRUTH_KEYS:
        if example.get(key) is not None:
            value = example[key]
            lines.append(f"{key}: {value if not isinstance(value, bytes) else '(bytes)'}")
    return "\n".join(lines)
