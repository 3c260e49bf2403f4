"""Chat messages with images -> model inputs, and the pixel budget that travels with a model.

`VLProcessor` is a tokenizer + image processor with one code path that works with and without torchvision
(transformers' own Qwen2VLProcessor cannot be built without it), so no global patch is needed. Its
`min_pixels`/`max_pixels` are resolved ONCE, when the policy is loaded (the config, else the budget saved
with the model); `budget` hands them, with the grid factor, to every consumer (tasks, eval, demo, vLLM).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, BatchFeature

from gpg_vl.images import QWEN_MAX_PIXELS, QWEN_MIN_PIXELS, ImageBudget, message_images, resize_messages

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def load_image_processor(path: str | Path, local_files_only: bool = False):
    """The image processor saved with a model, of the class its config names (Qwen2-VL, Qwen3-VL, ...).

    Uses the torchvision backend when torchvision imports, else the PIL one, so nothing needs torchvision.
    """
    from transformers import AutoImageProcessor
    from transformers.utils import is_torchvision_available

    backend = {} if is_torchvision_available() else {"backend": "pil"}
    return AutoImageProcessor.from_pretrained(path, local_files_only=local_files_only, **backend)


def image_processor_class():
    """Qwen2-VL's torchvision image processor when torchvision imports, else the PIL one (for building kits)."""
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        from transformers import Qwen2VLImageProcessor

        return Qwen2VLImageProcessor
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil


@dataclass
class VLProcessor:
    """Tokenizer + image processor: chat messages -> input_ids, attention_mask, pixel_values, image_grid_thw,
    mm_token_type_ids. Images must already be resized by `gpg_vl.images.resize_for_model`.
    """

    tokenizer: object
    image_processor: object
    min_pixels: int = QWEN_MIN_PIXELS  # the image budget every image is resized into (gpg_vl.images)
    max_pixels: int = QWEN_MAX_PIXELS
    model_type: str | None = None  # the model's family (config.json), for its native box frame

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids("<|image_pad|>")

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def eos_token_ids(self) -> list[int]:
        # Qwen instruct models end a turn with <|im_end|>; base models with <|endoftext|>. Both stop generation.
        ids = {self.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
        return sorted(i for i in ids if i is not None and i >= 0)

    @property
    def suppressed_token_ids(self) -> list[int]:
        """Vision special tokens a policy must never emit (a sampled <|image_pad|> breaks the next forward).

        Rollouts ban them and the training forward masks them too, so both score the same distribution.
        """
        ids = (self.tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS)
        return sorted(i for i in ids if i is not None and i >= 0)

    def render(self, messages: list[dict]) -> str:
        """Chat-template text; a final assistant message is continued rather than closed."""
        continue_final = messages[-1]["role"] == "assistant"
        return self.tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=not continue_final,
            continue_final_message=continue_final,
        )

    def __call__(self, batch: list[list[dict]], padding_side: str = "left") -> BatchFeature:
        """Encode a batch of conversations (left padding for generation)."""
        texts = [self.render(m) for m in batch]
        images = [img for m in batch for img in message_images(m)]
        out = {}
        if images:
            vision = self.image_processor(images=images, return_tensors="pt")
            out["pixel_values"], out["image_grid_thw"] = vision["pixel_values"], vision["image_grid_thw"]
            # Each <|image_pad|> stands for (t*h*w)/merge^2 tokens; expand it so the text matches the features.
            merge = self.image_processor.merge_size**2
            counts = iter((out["image_grid_thw"].prod(-1) // merge).tolist())
            texts = [_expand(t, "<|image_pad|>", counts) for t in texts]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side=padding_side)
        out["input_ids"], out["attention_mask"] = enc["input_ids"], enc["attention_mask"]
        # The model needs mm_token_type_ids (1 on image tokens) whenever it gets pixel_values.
        out["mm_token_type_ids"] = (enc["input_ids"] == self.image_token_id).long()
        return BatchFeature(out)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @property
    def image_factor(self) -> int:
        """Pixels per side of one merged image token: patch x merge (28 for Qwen2/2.5-VL, 32 for Qwen3-VL)."""
        return int(self.image_processor.patch_size * self.image_processor.merge_size)

    @property
    def budget(self) -> ImageBudget:
        """The image budget this processor resizes into, its grid factor included: what tasks, eval, the demo
        and vLLM are handed."""
        from gpg_vl.boxes import NATIVE_BOX_FRAMES

        frame = NATIVE_BOX_FRAMES.get(self.model_type or "")
        return ImageBudget(int(self.min_pixels), int(self.max_pixels), self.image_factor, frame)

    def resize(self, messages: list[dict]) -> list[dict]:
        """Messages with every image resized into this processor's pixel budget, on its patch grid."""
        return resize_messages(messages, self.min_pixels, self.max_pixels, self.image_factor)

    def save_pretrained(self, path: str | Path) -> None:
        save_processor(path, self.tokenizer, self.image_processor)


def _expand(text: str, token: str, counts) -> str:
    parts = text.split(token)
    return "".join(p + (token * next(counts) if i < len(parts) - 1 else "") for i, p in enumerate(parts))


def save_processor(path: str | Path, tokenizer, image_processor) -> None:
    """Save tokenizer (with chat template) and image processor so AutoProcessor and `load_processor` read them."""
    tokenizer.save_pretrained(path)
    image_processor.save_pretrained(path)


def load_processor(
    path: str | Path, min_pixels: int | None = None, max_pixels: int | None = None, local_files_only: bool = False
) -> VLProcessor:
    """Tokenizer + image processor of a model folder or hub id, with the pixel budget set.

    A budget left as None is the one saved with the model, so a checkpoint is evaluated and demoed on
    images of the size it was trained on.
    """
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_files_only)
    tokenizer.padding_side = "left"
    image_processor = load_image_processor(path, local_files_only=local_files_only)
    size = dict(getattr(image_processor, "size", None) or {})
    min_pixels = min_pixels or size.get("shortest_edge") or getattr(image_processor, "min_pixels", None) or QWEN_MIN_PIXELS
    max_pixels = max_pixels or size.get("longest_edge") or getattr(image_processor, "max_pixels", None) or QWEN_MAX_PIXELS
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels ({min_pixels}) is larger than max_pixels ({max_pixels})")
    # saved with checkpoints, so the budget travels with the model
    image_processor.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if hasattr(image_processor, name):
            setattr(image_processor, name, value)
    return VLProcessor(tokenizer, image_processor, min_pixels, max_pixels, _model_type(path, local_files_only))


def _model_type(path: str | Path, local_files_only: bool) -> str | None:
    """The `model_type` in the model's config.json (qwen2_vl, qwen2_5_vl, qwen3_vl, ...); None without one."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=local_files_only).model_type
    except (OSError, ValueError):  # a processor-only folder: no config.json
        return None
