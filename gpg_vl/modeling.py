"""The one way gpg-vl loads a policy and its processor: a hub id, a local folder, or a built-in tiny preset.

`VLProcessor` turns chat messages with images into model inputs with one code path that works with and
without torchvision (transformers' own Qwen2VLProcessor cannot be built without it), so no global patch
is needed anywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer, BatchFeature

from gpg_vl import hub
from gpg_vl.images import message_images

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
BUILTIN_PREFIX = "builtin:"
# builtin presets: name -> (arch, size preset, format warm-up on the shapes task?)
BUILTINS = {
    "tiny": ("qwen2_vl", "tiny", False),
    "tiny-warm": ("qwen2_vl", "tiny", True),
    "tiny-qwen2_5_vl": ("qwen2_5_vl", "tiny", False),
    "small-20m": ("qwen2_vl", "small-20m", False),
}
KIT_VERSION = "2"  # bump when the tiny kit changes, so stale caches are rebuilt


class ModelLoadError(RuntimeError):
    """A model or processor that cannot be found or read."""


def image_processor_class():
    """Qwen2-VL's torchvision image processor when torchvision imports, else the PIL one."""
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
    min_pixels: int = 56 * 56  # the image budget every image is resized into (gpg_vl.images)
    max_pixels: int = 28 * 28 * 1280

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

    def resize(self, messages: list[dict]) -> list[dict]:
        """Messages with every image resized into this processor's pixel budget."""
        from gpg_vl.images import resize_messages

        return resize_messages(messages, self.min_pixels, self.max_pixels)

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
    image_processor = image_processor_class().from_pretrained(path, local_files_only=local_files_only)
    size = dict(getattr(image_processor, "size", None) or {})
    min_pixels = min_pixels or size.get("shortest_edge") or getattr(image_processor, "min_pixels", None) or 56 * 56
    max_pixels = max_pixels or size.get("longest_edge") or getattr(image_processor, "max_pixels", None) or 28 * 28 * 1280
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels ({min_pixels}) is larger than max_pixels ({max_pixels})")
    # saved with checkpoints, so the budget travels with the model
    image_processor.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if hasattr(image_processor, name):
            setattr(image_processor, name, value)
    return VLProcessor(tokenizer, image_processor, min_pixels, max_pixels)


def cache_dir() -> Path:
    """Where built-in presets are built once and reused ($GPG_VL_CACHE, default ~/.cache/gpg-vl)."""
    return Path(os.environ.get("GPG_VL_CACHE", Path.home() / ".cache" / "gpg-vl"))


def resolve_model_path(name_or_path: str) -> str:
    """A loadable folder or hub id; `builtin:<preset>` is built (and cached) on first use."""
    if not name_or_path.startswith(BUILTIN_PREFIX):
        return name_or_path
    preset = name_or_path[len(BUILTIN_PREFIX) :]
    if preset not in BUILTINS:
        raise ModelLoadError(f"unknown built-in model {name_or_path!r}; choose one of {', '.join(BUILTIN_PREFIX + k for k in BUILTINS)}")
    arch, size, warm = BUILTINS[preset]
    folder = cache_dir() / f"{preset}-v{KIT_VERSION}"
    if not (folder / "config.json").exists():
        from gpg_vl.tiny import make_tiny

        if warm:
            from gpg_vl.warmup import make_format_warm

            make_format_warm(folder, base=resolve_model_path(BUILTIN_PREFIX + "tiny"))
        else:
            make_tiny(folder, arch=arch, preset=size)
    return str(folder)


def _advice(path: str) -> str:
    return (
        "If this machine has no hub access, download the weights elsewhere "
        f"(`huggingface-cli download {path} --local-dir DIR`) and set model.name_or_path=DIR."
    )


def check_model_source(path: str) -> bool:
    """Fail in a second when a hub model can be neither reached nor found in the cache.

    Returns True when loading must use the local cache only (hub unreachable, repo cached).
    """
    if not hub.is_hub_id(path) or hub.reachable(path):
        return False
    if not hub.is_cached(path):
        raise ModelLoadError(f"model {path!r} is not a local folder, the hub cannot be reached, and it is not cached.\n{_advice(path)}")
    return True


def torch_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on CUDA and float32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"model.dtype must be auto, float32, bfloat16 or float16; got {name!r}") from None


def load_policy(model_cfg, device: torch.device | str = "cpu"):
    """(model, processor) for a `ModelConfig`: hub id, local folder or builtin preset, on `device`."""
    device = torch.device(device)
    path = resolve_model_path(model_cfg.name_or_path)
    local = Path(path).expanduser()
    if path.startswith((".", "/", "~")) and not local.exists():
        raise ModelLoadError(f"model folder not found: {path}")
    if local.is_dir() and not (local / "config.json").exists():
        raise ModelLoadError(f"{path} is not a model folder: it has no config.json")
    try:
        local_only = check_model_source(path)
        AutoConfig.from_pretrained(path, local_files_only=local_only)  # fails fast, before any weight download
        model = AutoModelForImageTextToText.from_pretrained(
            path,
            dtype=torch_dtype(model_cfg.dtype, device),
            attn_implementation=model_cfg.attn_implementation,
            local_files_only=local_only,
        )
        processor = load_processor(path, model_cfg.min_pixels, model_cfg.max_pixels, local_files_only=local_only)
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(
            f"could not load model {path!r}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}\n{_advice(path)}"
        ) from None
    model.to(device)
    if model_cfg.freeze_vision:
        for p in vision_tower(model).parameters():
            p.requires_grad_(False)
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model, processor


def vision_tower(model) -> torch.nn.Module:
    """The ViT of a Qwen2-VL / Qwen2.5-VL model (its attribute path moved between transformers versions)."""
    inner = getattr(model, "model", model)
    for name in ("visual", "vision_tower"):
        if hasattr(inner, name):
            return getattr(inner, name)
    raise AttributeError(f"{type(model).__name__} has no vision tower attribute")
