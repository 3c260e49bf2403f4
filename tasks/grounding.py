"""Grounding tasks: LISA reasoning grounding as Visual-RFT (`lisa`) and RefCOCO as VLM-R1 (`refcoco`).

Both ask for one box inside <answer></answer> and reward format + a continuous IoU, or GIoU + 1 (in [0, 2],
the paper's LISA reward) with `reward="giou"`. LISA boxes are `(x1,y1),(x2,y2)` on a 0-1000 scale of the
image; RefCOCO boxes are `[x1, y1, x2, y2]` in pixels of the image as Qwen2-VL's processor resized it,
mapped back to the original size before the IoU. `synthetic[:N]` draws coloured shapes instead.
"""

from __future__ import annotations

import io
import random
import re
from collections.abc import Sequence
from typing import Any

from PIL import Image

from gpg_vl.data import DataError, data_folder, read_records, resolve_image_ref, synthetic_spec, to_pil
from gpg_vl.parsing import extract_answer, format_ok
from gpg_vl.task import RewardOutput, Task
from gpg_vl.boxes import (
    BOX_FRAMES,
    Box,
    box_giou,
    box_iou,
    clip_box,
    frame_size,
    grounding_metrics,
    parse_list_box,
    parse_point_pair_box,
    rescale_box,
)
from gpg_vl_tasks.grounding_synthetic import draw_scene

# Visual-RFT's LISA training prompt (grpo_lisa.py + gen_sft.py), typos included: the policy was trained on it.
LISA_PROMPT = (
    "Output the bounding box in the image corresponding to the instruction: {instruction} "
    "Output the thinking process in <think> </think> and your grouding box. "
    'Following "<think> thinking process </think>\n<answer>(x1,y1),(x2,y2)</answer>)" format.'
)
# VLM-R1's REC question template (vlm_modules/qwen_module.py, task "rec").
REFCOCO_PROMPT = (
    "{problem} First output the thinking process in <think> </think> tags and then output the final answer in "
    "<answer> </answer> tags. Output the final answer in JSON format."
)
REFCOCO_PROBLEM = "Please provide the bounding box coordinate of the region this sentence describes: {expression}."
LISA_SCALE = 1000.0
REWARDS = ("iou", "giou")


class _BoxTask(Task):
    """What LISA and RefCOCO share: one target box per example, format + IoU/GIoU reward, mIoU/acc@0.5.

    Both implement `gpg_vl.task.GroundingTask` (parse_box, predicted_box, box_scale), which the demo draws with.
    """

    box_scale: float | None = None  # the frame of example["box"]: a 0-N normalised scale, or None for pixels
    default_box_frame: str = "thousandths"  # the frame the task's reference repo has the model answer in

    def __init__(
        self,
        prompt_style: str = "instruct",
        reward: str = "iou",
        image_root: str | None = None,
        synthetic_easy: bool = False,
        box_frame: str | None = None,
        **options,
    ):
        """reward: iou | giou. image_root: where relative image paths live (default: the data file's folder).
        synthetic_easy: the twin draws the target alone, a square in the top-left corner of a square image,
        its side 1/4 or 3/4 of the image (the twin of benchmarks/twins/lisa.yaml; docs/learning.md says why).
        box_frame: the numbers the model writes a box in: thousandths (0-1000 of width and height) |
        resized_pixels (pixels of the image the processor fed it) | auto (the loaded model family's own);
        default: the reference repo's (lisa: thousandths as Visual-RFT, refcoco: resized_pixels as VLM-R1)."""
        super().__init__(prompt_style=prompt_style, **options)
        if reward not in REWARDS:
            raise ValueError(f"{self.name}: reward must be one of {REWARDS}, got {reward!r}")
        box_frame = box_frame or self.default_box_frame
        if box_frame not in (*BOX_FRAMES, "auto"):
            raise ValueError(f"{self.name}: box_frame must be one of {(*BOX_FRAMES, 'auto')}, got {box_frame!r}")
        self.reward, self.image_root, self.synthetic_easy = reward, image_root, bool(synthetic_easy)
        self.box_frame = box_frame

    # ---- what each grounding task defines ---------------------------------------------------------
    def prompt_text(self, example: dict) -> str:
        raise NotImplementedError

    def read_box(self, text: str) -> Box | None:
        """The first box written in the task's answer form, as written."""
        raise NotImplementedError

    def write_box(self, box: Box) -> str:
        """A box in the task's answer form (the numbers rounded)."""
        raise NotImplementedError

    def truth_frame_size(self, example: dict) -> tuple[float, float]:
        """(width, height) of the frame `example["box"]` is stored in."""
        raise NotImplementedError

    # ---- frames: the model's (box_frame) and the stored box's -------------------------------------
    def answer_frame(self) -> str:
        """The frame the model writes boxes in: `box_frame`, or for auto the loaded model family's."""
        if self.box_frame != "auto":
            return self.box_frame
        native = self.image_budget.native_box_frame if self.image_budget is not None else None
        if native is None:
            raise ValueError(f"{self.name}: box_frame=auto needs a model of a known family (Qwen2-VL, Qwen2.5-VL, "
                             f"Qwen3-VL); set task.options.box_frame to one of {BOX_FRAMES}")  # fmt: skip
        return native

    def answer_frame_size(self, example: dict) -> tuple[float, float]:
        """(width, height) of the frame the model writes boxes in, for this example's image."""
        frame = self.answer_frame()
        if frame != "resized_pixels":  # a normalised frame needs no image size (an upload may not have one)
            return frame_size(frame, None)
        resized = self.image_budget.resized_size(*self.original_size(example)) if self.image_budget is not None else None
        return frame_size(frame, resized)

    def box_in_frame(self, raw: Box, example: dict) -> Box | None:
        """A box as written, in the frame of `example["box"]` and clipped to it; None when it is not a valid box."""
        width, height = self.truth_frame_size(example)
        return clip_box(rescale_box(raw, self.answer_frame_size(example), (width, height)), width, height)

    def reference_answer(self, example: dict) -> str | None:
        """The true box as the model should write it: in the answer frame, in the task's answer form."""
        return self.write_box(rescale_box(tuple(example["box"]), self.truth_frame_size(example), self.answer_frame_size(example)))

    def original_size(self, example: dict) -> tuple[int, int]:
        """(width, height) of the example's image as stored."""
        if "width" not in example or "height" not in example:
            # Read lazily: RefCOCO training files list ~100k images, too many headers to read at load time.
            example["width"], example["height"] = _image_size(example["image"], f"{self.name} example {example['id']}")
        return int(example["width"]), int(example["height"])

    def examples_from_row(self, row: dict, index: int, base_dir: str | None, split: str, where: str) -> list[dict]:
        """The examples one data row gives (DataError naming `where` when the row is malformed)."""
        raise NotImplementedError

    def synthetic(self, size: int, seed: int) -> list[dict]:
        """The offline twin: `size` drawn examples, the same for the same seed."""
        examples = []
        for i in range(size):
            scene = draw_scene(random.Random(seed * 1_000_003 + i), easy=self.synthetic_easy)
            base = {"id": f"synthetic-{i}", "image": scene["image"], "width": scene["width"], "height": scene["height"]}
            examples.append({**base, **self.synthetic_fields(scene)})
        return examples

    def synthetic_fields(self, scene: dict) -> dict:
        """The task's own fields (its text and its box form) for one drawn scene."""
        raise NotImplementedError

    # ---- the Task API ----------------------------------------------------------------------------
    def load(self, path: str | None = None, split: str = "train") -> list[dict]:
        path = self.data_path(path, split)
        spec = synthetic_spec(path, split)
        if spec is not None:
            return self.synthetic(*spec)
        rows = read_records(path, split)
        base_dir = self.image_root or data_folder(path)
        examples = []
        for index, row in enumerate(rows):
            where = f"{path}: row {index}"
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            for example in self.examples_from_row(row, index, base_dir, split, where):
                examples.append({**example, "origin": where})
        return examples

    def messages(self, example: dict) -> list[dict]:
        image = to_pil(example["image"], where=self.origin(example))
        return self.conversation([image], self.prompt_text(example))

    def score(self, completion: str, example: dict) -> RewardOutput:
        fmt = float(format_ok(self.full_completion(completion)))
        pred = self.predicted_box(completion, example)
        target = tuple(example["box"])
        iou = box_iou(pred, target) if pred else 0.0
        components = {"format": fmt, "iou": iou}
        if self.reward == "giou":
            # GIoU + 1 keeps a wrong but valid box above a missing one (0), as Visual-RFT's LISA reward does.
            components["giou"] = box_giou(pred, target) + 1.0 if pred else 0.0
            return RewardOutput(fmt + components["giou"], components)
        return RewardOutput(fmt + iou, components)

    def metrics(self, examples: Sequence[dict], completions: Sequence[str]) -> dict[str, float]:
        if len(examples) != len(completions):
            raise ValueError(f"{len(examples)} examples but {len(completions)} completions")
        return grounding_metrics([self.score(c, ex).components["iou"] for ex, c in zip(examples, completions)])

    def is_correct(self, reward: RewardOutput, example: dict) -> bool | None:
        """Right when the box overlaps the ground truth with IoU > 0.5 (the acc@0.5 the grounding papers report)."""
        return reward.components["iou"] > 0.5

    def parse_answer(self, completion: str) -> str | None:
        """The answer's box as written, `x1,y1,x2,y2` in the model's frame; None when there is none."""
        box = self.parse_box(completion)
        return None if box is None else ",".join(f"{v:g}" for v in box)

    def record_fields(self, example: dict) -> dict[str, Any]:
        fields = {k: example[k] for k in ("id", "instruction", "problem", "width", "height") if k in example}
        fields["box"] = list(example["box"])
        if isinstance(example.get("image"), str):
            fields["image_path"] = example["image"]
        return fields

    # ---- the grounding protocol (gpg_vl.task.GroundingTask) -----------------------------------------
    def parse_box(self, completion: str) -> Box | None:
        """The box a completion writes, as written (the model's frame); None when it gives none."""
        text = self.full_completion(completion)
        # The last <answer> block when there is one (Visual-RFT/VLM-R1 training rewards), else the whole text
        # (Visual-RFT's LISA evaluation searches the whole response).
        answer = extract_answer(text)
        return self.read_box(answer if answer is not None else text)

    def predicted_box(self, completion: str, example: dict) -> Box | None:
        """The box a completion predicts in the frame of `example["box"]` (see `box_scale`), as the reward reads it."""
        raw = self.parse_box(completion)
        return None if raw is None else self.box_in_frame(raw, example)


class LisaTask(_BoxTask):
    """LISA reasoning grounding as Visual-RFT: an instruction, a box `(x1,y1),(x2,y2)` on a 0-1000 scale."""

    name = "lisa"
    description = "LISA reasoning grounding (Visual-RFT): a box (x1,y1),(x2,y2) on a 0-1000 scale; IoU or GIoU reward."
    missing_data_hint = (
        "no public hub copy of this data; pass Visual-RFT's lisa_{train,val,test}.json box files or "
        "lisa_train_sft.json, or synthetic[:N]"
    )
    box_scale = LISA_SCALE

    def prompt_text(self, example: dict) -> str:
        return LISA_PROMPT.format(instruction=example["instruction"])

    def read_box(self, text: str) -> Box | None:
        return parse_point_pair_box(text)

    def write_box(self, box: Box) -> str:
        x1, y1, x2, y2 = (round(v) for v in box)
        return f"({x1},{y1}),({x2},{y2})"

    def truth_frame_size(self, example: dict) -> tuple[float, float]:
        return LISA_SCALE, LISA_SCALE

    def examples_from_row(self, row: dict, index: int, base_dir: str | None, split: str, where: str) -> list[dict]:
        """Visual-RFT's box file row, or a row of its SFT conversation file (see `_lisa_from_conversation`)."""
        if "conversations" in row:
            return [_lisa_from_conversation(row, index, base_dir, where)]
        missing = [k for k in ("image_path", "instruction", "boxes") if k not in row]
        if missing:
            raise DataError(
                f"{where}: missing {missing}; expected Visual-RFT's box file (image_path, instruction, boxes) "
                "or its SFT file (conversations)"
            )
        image = resolve_image_ref(row["image_path"], base_dir, where)
        width, height = _image_size(image, where)
        box = _box_from_value(row["boxes"][0] if isinstance(row["boxes"], list) and row["boxes"] else None, where)
        scaled = _to_thousandths(box, width, height)
        instructions = row["instruction"] if isinstance(row["instruction"], list) else [row["instruction"]]
        if not instructions or not all(isinstance(t, str) and t.strip() for t in instructions):
            raise DataError(f"{where}: 'instruction' must be a non-empty string or list of strings")
        # Training expands every instruction into an example (Visual-RFT's gen_sft.py); evaluation uses the first.
        chosen = instructions if self.is_train_split(split) else instructions[:1]
        base_id = str(row.get("id", index))
        return [
            {
                "id": base_id if len(chosen) == 1 else f"{base_id}-{k}",
                "image": image,
                "instruction": text.strip(),
                "box": scaled,
                "width": width,
                "height": height,
            }
            for k, text in enumerate(chosen)
        ]

    def synthetic_fields(self, scene: dict) -> dict:
        return {
            "instruction": f"Find {scene['description']}.",
            "box": _to_thousandths(scene["box"], scene["width"], scene["height"]),
        }


class RefCOCOTask(_BoxTask):
    """RefCOCO/+/g as VLM-R1: a referring expression, a box `[x1, y1, x2, y2]` in pixels of the resized image."""

    name = "refcoco"
    description = "RefCOCO referring expressions (VLM-R1): [x1, y1, x2, y2] in resized-image pixels; IoU/GIoU reward."
    missing_data_hint = (
        "no public hub copy of this data; pass VLM-R1's rec_jsons_processed/*.json or its *.jsonl conversation "
        "files, or synthetic[:N]"
    )

    def prompt_text(self, example: dict) -> str:
        return REFCOCO_PROMPT.format(problem=example["problem"])

    default_box_frame = "resized_pixels"  # VLM-R1's resize_bbox: pixels of the image at the processor's size

    def read_box(self, text: str) -> Box | None:
        return parse_list_box(text)

    def write_box(self, box: Box) -> str:
        x1, y1, x2, y2 = (round(v) for v in box)
        return f"[{x1}, {y1}, {x2}, {y2}]"

    def truth_frame_size(self, example: dict) -> tuple[float, float]:
        return self.original_size(example)  # RefCOCO stores boxes in pixels of the original image

    def examples_from_row(self, row: dict, index: int, base_dir: str | None, split: str, where: str) -> list[dict]:
        """VLM-R1's `image, problem, solution` row, or its `image, conversations` JSONL row."""
        if "image" not in row:
            raise DataError(f"{where}: missing 'image'; expected VLM-R1's (image, problem, solution) or conversations")
        if "conversations" in row:
            turns = _turns(row["conversations"], where)
            problem = turns["user"].replace("<image>", "").strip()
            box = parse_list_box(turns["assistant"])
            if box is None:
                raise DataError(f"{where}: assistant turn has no [x1, y1, x2, y2] box: {turns['assistant'][:100]!r}")
        elif "problem" in row and "solution" in row:
            problem, box = str(row["problem"]).strip(), _box_from_value(row["solution"], where)
        else:
            raise DataError(f"{where}: expected (image, problem, solution) or (image, conversations): {sorted(row)}")
        image = row["image"]
        if isinstance(image, list):
            if len(image) != 1:
                raise DataError(f"{where}: RefCOCO examples have one image, got {len(image)}")
            image = image[0]
        image = resolve_image_ref(image, base_dir, where)
        return [{"id": str(row.get("id", index)), "image": image, "problem": problem, "box": list(box)}]

    def synthetic_fields(self, scene: dict) -> dict:
        return {"problem": REFCOCO_PROBLEM.format(expression=scene["description"]), "box": list(scene["box"])}


# ---- loading helpers ----------------------------------------------------------------------------




def _image_size(image: Any, where: str) -> tuple[int, int]:
    """(width, height) of an image reference, reading only the header of a file or of encoded bytes."""
    if isinstance(image, Image.Image):
        return image.size
    source = image.get("bytes") if isinstance(image, dict) else image
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as opened:
            return opened.size
    except Exception as e:  # PIL raises several types on unreadable files
        raise DataError(f"{where}: unreadable image ({type(e).__name__}: {e})") from None


def _to_thousandths(box: Sequence[float], width: float, height: float) -> list[float]:
    """A pixel box on the 0-1000 scale LISA answers use (Visual-RFT divides by the image size, times 1000)."""
    sx, sy = LISA_SCALE / width, LISA_SCALE / height
    return [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]


def _box_from_value(value: Any, where: str) -> Box:
    """A ground-truth box from a list of four numbers or a string holding `[x1, y1, x2, y2]`."""
    box = None
    if isinstance(value, (list, tuple)) and len(value) == 4:
        try:
            box = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            box = None
    elif isinstance(value, str):
        box = parse_list_box(value)
    if box is None or not (box[2] > box[0] and box[3] > box[1]):
        raise DataError(f"{where}: ground-truth box must be [x1, y1, x2, y2] with x2 > x1 and y2 > y1, got {value!r}")
    return box  # type: ignore[return-value]


def _turns(conversations: Any, where: str) -> dict[str, str]:
    """The first user and assistant texts of a conversation list (`from`: user/human, assistant/gpt)."""
    roles = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
    turns: dict[str, str] = {}
    for message in conversations if isinstance(conversations, list) else []:
        role = roles.get(message.get("from", "")) if isinstance(message, dict) else None
        if role and role not in turns and isinstance(message.get("value"), str):
            turns[role] = message["value"]
    if set(turns) != {"user", "assistant"}:
        raise DataError(f"{where}: 'conversations' needs a user/human turn and an assistant/gpt turn")
    return turns


_IMG_TAG = re.compile(r"<img>(.*?)</img>", re.DOTALL)
_LISA_PREFIX = "Output the bounding box in the image corresponding to the instruction:"


def _lisa_from_conversation(row: dict, index: int, base_dir: str | None, where: str) -> dict:
    """A row of Visual-RFT's `lisa_train_sft.json` (made by gen_sft.py).

    User turn `<img>PATH</img>\\n Output the bounding box in the image corresponding to the instruction: TEXT`,
    assistant turn `(x1,y1),(x2,y2)` already on the 0-1000 scale. An `image` field may replace the <img> tag.
    """
    turns = _turns(row["conversations"], where)
    tag = _IMG_TAG.search(turns["user"])
    image = tag.group(1).strip() if tag else row.get("image")
    if image is None:
        raise DataError(f"{where}: no <img>PATH</img> in the user turn and no 'image' field")
    text = _IMG_TAG.sub("", turns["user"]).replace("<image>", "").strip()
    instruction = text.split(_LISA_PREFIX, 1)[-1].strip()
    box = parse_point_pair_box(turns["assistant"])
    if box is None or not (box[2] > box[0] and box[3] > box[1]) or not instruction:
        raise DataError(f"{where}: expected an instruction and an assistant box (x1,y1),(x2,y2); got {turns!r:.200}")
    resolved = resolve_image_ref(image, base_dir, where)
    width, height = _image_size(resolved, where)
    return {
        "id": str(row.get("id", index)),
        "image": resolved,
        "instruction": instruction,
        "box": list(box),
        "width": width,
        "height": height,
    }
