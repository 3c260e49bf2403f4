"""The offline kit: a tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL with random weights, a local tokenizer, a processor.

Everything a real checkpoint folder has (config, safetensors, tokenizer, chat template, image processor) so
the same `from_pretrained` code path serves the tiny model and `Qwen/Qwen2-VL-2B-Instruct`. Deterministic
for a given seed. Run: `gpg-vl make-tiny OUT --arch qwen2_vl --preset tiny`. The `2b-shape` preset has
Qwen2-VL-2B's real widths and vocabulary (151,936, special tokens at Qwen's ids) with 2 layers each side:
it shows the memory costs of the real model on a CPU.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

ARCHES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

# Qwen's special tokens, in Qwen's order; their ids follow the trained BPE vocabulary.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

FORMAT_TAGS = ["<think>", "</think>", "<answer>", "</answer>"]

# Qwen2-VL's real special tokens from id 151643 on, in order (the 2b-shape preset puts them at these ids).
QWEN_SPECIAL_IDS_FROM = 151643
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]
TINY_PIXELS = (56 * 56, 112 * 112)  # the tiny kit's image budget: 4 to 16 image tokens

# ChatML as Qwen2-VL renders it: a default system turn, one <|vision_start|><|image_pad|><|vision_end|>
# per image (the processor expands the pad to the image's token count), and an open assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or 'image' in item %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' or 'video' in item %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class TinyPreset:
    """Sizes of a kit model. `tiny` is the test/quickstart size; `small-20m` is for benchmarks; `2b-shape` has
    Qwen2-VL-2B's widths and vocabulary with 2 layers (memory benchmarks)."""

    hidden: int = 96
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 288
    vision_width: int = 64
    vision_depth: int = 2
    vision_heads: int = 4
    vocab_size: int = 512
    """BPE vocabulary trained on the tasks' text (special tokens included)."""
    pad_vocab_to: int | None = None
    """Pad the tokenizer with unused tokens to Qwen's special-token ids and the model to this vocabulary."""
    mrope_section: tuple | None = None
    """Rotary frequencies for (time, height, width); null: split head_dim/2 in thirds."""
    rope_theta: float = 10000.0


PRESETS = {
    "tiny": TinyPreset(),
    "small-20m": TinyPreset(
        hidden=384, layers=8, heads=6, kv_heads=2, ffn=1536, vision_width=256, vision_depth=6, vision_heads=4, vocab_size=2048
    ),
    # `tiny` with 32-wide attention heads (3 heads, 1 KV head): vLLM's CPU attention takes head sizes 32, 64,
    # 80, ... only, and tiny's 24 fails at the first generate (docs/kit.md). Same width, depth and vocabulary.
    "tiny-h32": TinyPreset(heads=3, kv_heads=1),
    # Qwen2-VL-2B-Instruct's config.json sizes, but 2 text and 2 vision layers
    "2b-shape": TinyPreset(
        hidden=1536, layers=2, heads=12, kv_heads=2, ffn=8960, vision_width=1280, vision_depth=2, vision_heads=16,
        vocab_size=2048, pad_vocab_to=151936, mrope_section=(16, 24, 24), rope_theta=1000000.0,
    ),
}


def _corpus(seed: int) -> list[str]:
    """Text the BPE is trained on: the tags, prompts and answers the built-in tasks use, plus digits/letters."""
    from gpg_vl.parsing import THINK_ANSWER_INSTRUCTION

    rng = random.Random(seed)
    words = (
        "what is the colour color of the large small shape circle square triangle star red green blue yellow "
        "purple orange white black image how many are there left right above below nearer closer farther "
        "which object point box the plant species identify angle degrees length cm find answer question choices "
        "a an in on to is of and this that please based count relation depth distance"
    ).split()
    lines = [THINK_ANSWER_INSTRUCTION] * 50
    for _ in range(3000):
        letter = rng.choice("ABCDEF")
        number = rng.randint(0, 360)
        phrase = " ".join(rng.choice(words) for _ in range(rng.randint(2, 8)))
        lines.append(f"<think>{phrase}</think><answer>({letter})</answer>")
        lines.append(f"<think> {phrase} </think> <answer>{number}</answer>")
        lines.append(f"({letter}) {phrase}? {number}")
    return lines


def build_tokenizer(vocab_size: int = 512, seed: int = 0, qwen_ids: bool = False):
    """A byte-level BPE trained on `_corpus`, wrapped as a `Qwen2Tokenizer` with Qwen's special tokens.

    `qwen_ids`: pad the vocabulary with unused tokens so the special tokens sit at Qwen2-VL's real ids.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(seed), trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]  # tokenizers 0.23 wants tuples
    vocab = model["vocab"]
    if qwen_ids:
        # unused fillers up to Qwen's first special id, then its specials in Qwen's order (at the real ids)
        vocab = dict(vocab)
        vocab.update({f"<|unused_{i}|>": i for i in range(len(vocab), QWEN_SPECIAL_IDS_FROM)})
        vocab.update({t: QWEN_SPECIAL_IDS_FROM + k for k, t in enumerate(QWEN_SPECIAL_TOKENS)})
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    specials = QWEN_SPECIAL_TOKENS if qwen_ids else SPECIAL_TOKENS
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    tokenizer.add_special_tokens({"pad_token": "<|endoftext|>"})
    # The answer-format tags as single (ordinary, decoded) tokens: a byte-level BPE splits them at the
    # angle brackets, and a tiny model learns faster when the letter is a larger share of its completion.
    tokenizer.add_tokens(FORMAT_TAGS)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"  # batched generation needs left padding
    return tokenizer


def build_model_config(arch: str, preset: TinyPreset, tokenizer):
    """A Qwen2-VL or Qwen2.5-VL config of `preset`'s sizes whose special ids match `tokenizer`."""
    if arch not in ARCHES:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHES)}")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = preset.hidden // preset.heads
    # mrope_section splits head_dim/2 rotary frequencies among (time, height, width); it must sum to head_dim/2
    half = head_dim // 2
    section = list(preset.mrope_section or [half - 2 * (half // 3), half // 3, half // 3])
    text = dict(
        vocab_size=preset.pad_vocab_to or len(tokenizer),
        hidden_size=preset.hidden,
        intermediate_size=preset.ffn,
        num_hidden_layers=preset.layers,
        num_attention_heads=preset.heads,
        num_key_value_heads=preset.kv_heads,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": preset.rope_theta, "mrope_section": section},
        bos_token_id=None,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=True,
    )
    common = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    if arch == "qwen2_vl":
        from transformers import Qwen2VLConfig

        vision = dict(
            depth=preset.vision_depth, embed_dim=preset.vision_width, hidden_size=preset.hidden, num_heads=preset.vision_heads
        )
        config = Qwen2VLConfig(text_config=text, vision_config=vision, **common)
    elif arch == "qwen3_vl":
        from transformers import Qwen3VLConfig

        text["head_dim"] = head_dim
        text["rope_parameters"]["mrope_interleaved"] = True
        vision = dict(
            depth=preset.vision_depth,
            hidden_size=preset.vision_width,
            intermediate_size=preset.vision_width * 2,
            num_heads=preset.vision_heads,
            out_hidden_size=preset.hidden,
            patch_size=16,
            spatial_merge_size=2,
            deepstack_visual_indexes=[0],
            num_position_embeddings=64,
        )
        config = Qwen3VLConfig(text_config=text, vision_config=vision, **common)
    else:
        from transformers import Qwen2_5_VLConfig

        vision = dict(
            depth=preset.vision_depth,
            hidden_size=preset.vision_width,
            out_hidden_size=preset.hidden,
            intermediate_size=preset.vision_width * 2,
            num_heads=preset.vision_heads,
            window_size=56,
            fullatt_block_indexes=[preset.vision_depth - 1],
        )
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
    config.eos_token_id = ids["<|im_end|>"]
    config.pad_token_id = ids["<|endoftext|>"]
    return config


def build_image_processor(min_pixels: int = TINY_PIXELS[0], max_pixels: int = TINY_PIXELS[1], patch_size: int = 14):
    """Qwen2-VL's image processor (Qwen3-VL uses the same with 16 px patches); PIL backend without torchvision."""
    from gpg_vl.processor import image_processor_class

    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    return image_processor_class()(size=size, patch_size=patch_size, merge_size=2, temporal_patch_size=2)


def make_tiny(
    out_dir: str | Path,
    arch: str = "qwen2_vl",
    preset: str = "tiny",
    seed: int = 0,
    min_pixels: int = TINY_PIXELS[0],
    max_pixels: int = TINY_PIXELS[1],
) -> Path:
    """Build and save a tiny model folder that `from_pretrained` (and `gpg_vl.modeling.load_policy`) loads."""
    from transformers import AutoModelForImageTextToText

    from gpg_vl.atomic import atomic_dir
    from gpg_vl.processor import save_processor

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    sizes = PRESETS[preset]
    tokenizer = build_tokenizer(sizes.vocab_size, seed, qwen_ids=sizes.pad_vocab_to is not None)
    config = build_model_config(arch, sizes, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.bos_token_id = None
    image_processor = build_image_processor(min_pixels, max_pixels, patch_size=16 if arch == "qwen3_vl" else 14)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        save_processor(tmp, tokenizer, image_processor)
    return Path(out_dir)
