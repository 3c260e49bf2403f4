"""Every supported model family trains through the real CLI: Qwen2-VL (tests/test_trainer.py), Qwen2.5-VL
and Qwen3-VL (tiny kit presets), with the image grid taken from each model's processor (28 px per merged
token for Qwen2/2.5-VL, 32 for Qwen3-VL); and a model without a chat template fails with the fix."""

import math

import pytest
import torch
from transformers import AutoModelForImageTextToText

from gpg_vl.cli import main
from gpg_vl.config import ModelConfig
from gpg_vl.kit import build_builtin
from gpg_vl.modeling import ModelLoadError, load_policy
from conftest import args_for, rows, weights


@pytest.mark.parametrize("preset, arch, factor", [("tiny-qwen2_5_vl", "qwen2_5_vl", 28), ("tiny-qwen3_vl", "qwen3_vl", 32)])
def test_family_trains_through_the_cli(preset, arch, factor, tmp_path):
    folder = build_builtin(f"builtin:{preset}")
    model, processor = load_policy(ModelConfig(name_or_path=folder))
    assert model.config.model_type == arch and processor.image_factor == factor
    out = tmp_path / preset
    # min_pixels = max_pixels = 56x56 is a 2x2 token grid at 28 px, and rounds to 64x64 at 32 px
    assert main(args_for(folder, out)) == 0
    log = rows(out)
    assert [r["step"] for r in log] == [1, 2] and all(math.isfinite(r["loss"]) and r["skipped"] == 0 for r in log)
    before, after = weights(folder), weights(out / "checkpoint-2")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    AutoModelForImageTextToText.from_pretrained(out / "checkpoint-2")  # an ordinary HF folder of that family


def test_images_are_resized_onto_the_processors_patch_grid():
    from PIL import Image

    for preset, factor in (("tiny", 28), ("tiny-qwen3_vl", 32)):
        _, processor = load_policy(ModelConfig(name_or_path=build_builtin(f"builtin:{preset}")))
        messages = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (100, 70))}]}]
        image = processor.resize(messages)[0]["content"][0]["image"]
        assert image.width % factor == 0 and image.height % factor == 0
        inputs = processor([messages])  # the expanded image tokens match the features the model will produce
        merged = int(inputs["image_grid_thw"].prod()) // processor.image_processor.merge_size**2
        assert int((inputs["input_ids"] == processor.image_token_id).sum()) == merged


def test_a_model_without_a_chat_template_fails_with_the_fix(tiny_model_dir, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    for name in ("chat_template.jinja", "chat_template.json"):
        (base / name).unlink(missing_ok=True)
    import json

    config = base / "tokenizer_config.json"
    data = json.loads(config.read_text())
    data.pop("chat_template", None)
    config.write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match="no chat template.*chat_template.json"):
        load_policy(ModelConfig(name_or_path=str(base)))
