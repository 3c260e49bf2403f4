"""The task plugin API: what a task must provide so one trainer, `gpg-vl eval` and the demo can use it.

A task loads examples (plain dicts), renders one as chat messages with PIL images inside, scores a
completion into a `RewardOutput`, and turns a list of completions into evaluation metrics (fractions in
[0, 1]). Register a task through the `gpg_vl.tasks` entry-point group or name it as `file.py:Class`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

from PIL import Image

from gpg_vl.data import DataError
from gpg_vl.images import ImageBudget
PROMPT_STYLES = ("instruct", "base")
Box = tuple[float, float, float, float]  # x1, y1, x2, y2


class NonFiniteReward(ValueError):
    """A reward total that is NaN or inf; the trainer turns it into a step the non-finite guard judges."""


@dataclass
class RewardOutput:
    """The score of one completion: `total` is what the trainer optimises, `components` what it logs."""

    total: float
    components: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.total = float(self.total)
        if not math.isfinite(self.total):
            raise NonFiniteReward(f"reward total must be finite, got {self.total}")
        self.components = {k: float(v) for k, v in self.components.items()}


class Task:
    """Base class of a task plugin. Subclasses set `name`/`description` and implement the four methods.

    Keyword options given to `get_task(name, **options)` reach `__init__`; unknown ones fail there.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: "instruct" (a user turn) or "base" (R1's system turn and an assistant turn opened with "<think>")
    prompt_style: str = "instruct"
    #: dataset used when no path is given (a hub id, or "synthetic" for a generated twin)
    default_train_data: ClassVar[str | None] = None
    default_eval_data: ClassVar[str | None] = None
    default_eval_split: ClassVar[str] = "test"
    #: what to pass instead when a split has no default data (the end of the DataError `data_path` raises)
    missing_data_hint: ClassVar[str] = "pass a local file or folder"

    def __init__(self, prompt_style: str = "instruct", **options: Any) -> None:
        if options:
            raise TypeError(f"task {self.name or type(self).__name__!r} got unknown options: {sorted(options)}")
        if prompt_style not in PROMPT_STYLES:
            raise ValueError(
                f"{self.name or type(self).__name__}: prompt_style must be one of {PROMPT_STYLES}, got {prompt_style!r}"
            )
        self.prompt_style = prompt_style
        # the loaded model's budget (trainer, eval and demo call configure_images); None until then
        self.image_budget: ImageBudget | None = None

    # ---- what every task implements -------------------------------------------------------------
    def load(self, path: str | None = None, split: str = "train") -> Sequence[dict]:
        """Load a split from a hub id or a local file/folder; returns a sequence of example dicts."""
        raise NotImplementedError

    def messages(self, example: dict) -> list[dict]:
        """Chat messages for one example, Qwen style: content items {"type": "image", "image": PIL} / text.

        A final assistant message, if present, is a prefix the model continues (base-model prompts).
        """
        raise NotImplementedError

    def score(self, completion: str, example: dict) -> RewardOutput:
        """Reward of one completion against its example. Never raises on any string."""
        raise NotImplementedError

    def metrics(self, examples: Sequence[dict], completions: Sequence[str]) -> dict[str, float]:
        """Evaluation metrics (fractions in [0, 1]) over aligned examples and completions."""
        raise NotImplementedError

    # ---- shared plumbing ---------------------------------------------------------------------------
    @staticmethod
    def is_train_split(split: str) -> bool:
        """Whether `split` names training data: "train", or a slice of it such as "train[:15000]"."""
        return split.partition("[")[0] == "train"

    def data_path(self, path: str | None, split: str) -> str:
        """`path`, or the task's default data for `split`; a DataError naming the task when it has none."""
        if path:
            return path
        default = self.default_train_data if self.is_train_split(split) else self.default_eval_data
        if default is None:
            raise DataError(f"{self.name}: no default data for split {split!r}; {self.missing_data_hint}")
        return default

    def origin(self, example: dict) -> str:
        """Where an example came from, for errors: its data file and row (loaders store it as "origin")."""
        return str(example.get("origin") or f"{self.name} example {example.get('id')}")

    # ---- optional hooks with sensible defaults ------------------------------------------------
    def configure_images(self, budget: ImageBudget) -> None:
        """Called by trainer/eval/demo with the loaded processor's `budget` (tasks that map boxes need it)."""
        self.image_budget = budget

    def conversation(self, images: list[Image.Image], text: str) -> list[dict]:
        """Chat messages showing `images` then `text`: one user turn (instruct), or R1's system turn, the user
        turn and an assistant turn opened with "<think>" that the model continues (base)."""
        from gpg_vl.parsing import R1_SYSTEM_PROMPT

        content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": text}]
        user = {"role": "user", "content": content}
        if self.prompt_style == "base":
            return [{"role": "system", "content": R1_SYSTEM_PROMPT}, user, {"role": "assistant", "content": "<think>"}]
        return [user]

    def full_completion(self, completion: str) -> str:
        """The model's whole turn: a base-style prompt ends in "<think>", which the completion continues."""
        text = completion if isinstance(completion, str) else ""
        if self.prompt_style == "base" and not text.lstrip().startswith("<think>"):
            return "<think>" + text
        return text

    def parse_answer(self, completion: str) -> str | None:
        """The final answer a completion gives (for records and the demo); None when there is none."""
        from gpg_vl.parsing import extract_answer

        return extract_answer(self.full_completion(completion))

    def is_correct(self, reward: RewardOutput, example: dict) -> bool | None:
        """Whether a scored completion counts as right (records' `correct`, pass@k): the `accuracy` component
        is 1; None when the task reports no accuracy (then there is no pass@k)."""
        if "accuracy" not in reward.components:
            return None
        return reward.components["accuracy"] >= 1.0

    def reference_answer(self, example: dict) -> str | None:
        """The ground truth as the model should write it inside <answer></answer> (format warm-ups teach the
        task's answer form from other examples' references); None when the task does not say."""
        return None

    def warmup_answer(self, examples: Sequence[dict], rng) -> str:
        """An answer of this task's form that says nothing about the prompt: the format warm-up's target
        (gpg_vl/warmup.py). By default the `reference_answer` of a random one of `examples`."""
        answer = self.reference_answer(rng.choice(examples))
        if answer is None:
            raise ValueError(f"task {self.name!r} has no reference_answer, so it cannot be format-warmed")
        return answer

    def example_id(self, example: dict, index: int) -> str:
        """A stable id for records and resumable evaluation."""
        for key in ("id", "idx", "image_id"):
            if key in example and example[key] is not None:
                return str(example[key])
        return str(index)

    def record_fields(self, example: dict) -> dict[str, Any]:
        """JSON-safe task fields copied into evaluation records (category, ground truth, box, ...)."""
        return {
            k: v
            for k, v in example.items()
            if isinstance(v, (str, int, float, bool)) or (isinstance(v, list) and all(isinstance(x, (int, float, str)) for x in v))
        }


@runtime_checkable
class GroundingTask(Protocol):
    """What a task whose answers are boxes offers, so the demo draws exactly the box the reward scored.

    Three frames meet here. `parse_box` gives the box as the model wrote it (LISA: a 0-1000 scale; RefCOCO:
    pixels of the resized image the processor fed the model). `predicted_box` maps it into the frame of
    `example["box"]`, clipped, or None when it is not a valid box. `box_scale` names that frame: N for a 0-N
    scale of the image's width and height (LISA: 1000), None for pixels of the original image.
    """

    box_scale: float | None

    def parse_box(self, completion: str) -> Box | None: ...

    def predicted_box(self, completion: str, example: dict) -> Box | None: ...
