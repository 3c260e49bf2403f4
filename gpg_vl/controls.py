"""Visual-dependence controls: does the policy look at the image? Each control re-runs an evaluation on
altered images and is scored with the task's own metrics against the true references.

`blind` replaces every image with a uniform grey one of the same size (same token count and positions);
`shuffled` gives each example another example's images through a fixed permutation with no fixed point.
`visual_gain/<metric>` is the real metric minus the blind one: how much of the score comes from the pixels.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from PIL import Image

from gpg_vl.task import Task

CONTROLS = ("blind", "shuffled")
BLIND_GREY = (128, 128, 128)  # one fixed colour: an image's own mean colour would leak (the shapes twin asks colours)


def check_controls(controls: Sequence[str], where: str) -> list[str]:
    """`controls` as a list, each known and given once; a ValueError naming `where` otherwise."""
    unknown = [c for c in controls if c not in CONTROLS]
    if unknown:
        raise ValueError(f"{where}: unknown control {unknown[0]!r}; choose from {list(CONTROLS)}")
    if len(set(controls)) != len(controls):
        raise ValueError(f"{where}: a control is listed twice: {list(controls)}")
    return list(controls)


def donor_indices(count: int, seed: int = 0) -> list[int]:
    """donor[i]: whose images example i gets under `shuffled`. A seeded cycle through all examples, so no
    example keeps its own images (count > 1) and the same split always gets the same permutation."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    donor = [0] * count
    for k, i in enumerate(order):
        donor[i] = order[(k + 1) % count]
    return donor


def _replace_images(messages: list[dict], images: list[Image.Image]) -> list[dict]:
    """A copy of `messages` whose k-th image item shows images[k]."""
    feed = iter(images)
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = [{**item, "image": next(feed)} if item.get("type") == "image" else item for item in content]
        out.append({**message, "content": content})
    return out


def blind_messages(messages: list[dict]) -> list[dict]:
    """Every image replaced by a uniform grey image of its size."""
    from gpg_vl.images import message_images

    return _replace_images(messages, [Image.new("RGB", im.size, BLIND_GREY) for im in message_images(messages)])


def shuffled_messages(messages: list[dict], donor: list[dict]) -> list[dict]:
    """Every image replaced by the donor's image at the same position (its last when it has fewer), resized
    to the replaced image's size so the prompt's token count is unchanged."""
    from gpg_vl.images import message_images

    theirs = message_images(donor)
    if not theirs:
        return blind_messages(messages)  # a donor without images gives nothing to see
    mine = message_images(messages)
    swapped = [theirs[min(k, len(theirs) - 1)].convert("RGB").resize(im.size, Image.BICUBIC) for k, im in enumerate(mine)]
    return _replace_images(messages, swapped)


class ControlledTask:
    """`task` with its prompts' images altered by `control`; everything else (scoring, metrics, budget) is
    the task's own. `examples` is the evaluated split, in order: `shuffled` draws donors from it."""

    def __init__(self, task: Task, control: str, examples: Sequence[dict], seed: int = 0) -> None:
        check_controls([control], "controls")
        self.task, self.control = task, control
        donors = donor_indices(len(examples), seed)
        # keyed by identity: the generation code hands back the very dicts of `examples` (or slices of them)
        self._donor = {id(e): examples[d] for e, d in zip(examples, donors)}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.task, name)

    def messages(self, example: dict) -> list[dict]:
        messages = self.task.messages(example)
        if self.control == "blind":
            return blind_messages(messages)
        if id(example) not in self._donor:
            raise KeyError(f"shuffled control: example {example.get('id', '?')} is not one of the evaluated examples")
        return shuffled_messages(messages, self.task.messages(self._donor[id(example)]))


def with_controls(metrics: dict[str, float], by_control: dict[str, dict[str, float]]) -> dict[str, float]:
    """The real metrics, then `<control>/<metric>` for each control, then `visual_gain/<metric>` (real minus
    blind) for each metric both have."""
    out = dict(metrics)
    for control, values in by_control.items():
        out.update({f"{control}/{k}": v for k, v in values.items()})
    blind = by_control.get("blind", {})
    out.update({f"visual_gain/{k}": v - blind[k] for k, v in metrics.items() if k in blind})
    return out
