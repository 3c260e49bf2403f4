"""The offline kit: the tiny model builds, saves, reloads, generates with an image and back-propagates,
deterministically, for both architectures, with and without torchvision."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from gpg_vl.cli import main
from gpg_vl.config import ModelConfig
from gpg_vl.kit import build_builtin
from gpg_vl.modeling import ModelLoadError, load_policy, resolve_model_path
from gpg_vl.tiny import SPECIAL_TOKENS, make_tiny

MESSAGES = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (90, 60), "red")}, {"type": "text", "text": "What colour?"}]}]


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_tiny_builds_reloads_generates_and_backpropagates(arch, tmp_path):
    folder = make_tiny(tmp_path / arch, arch=arch)
    model = AutoModelForImageTextToText.from_pretrained(folder)  # an ordinary HF folder
    assert model.config.model_type == arch
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert type(AutoProcessor.from_pretrained(folder)).__name__.endswith("Processor")
    policy, processor = load_policy(ModelConfig(name_or_path=str(folder), min_pixels=3136, max_pixels=12544))
    from gpg_vl.images import resize_messages

    inputs = processor([resize_messages(MESSAGES, 3136, 12544)])
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == inputs["image_grid_thw"].prod() // 4
    out = policy.generate(**inputs, max_new_tokens=5, do_sample=True, top_k=0)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    loss = policy(**inputs).logits.float().logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None for p in policy.parameters() if p.requires_grad)


def test_same_seed_same_model_other_seed_other_weights(tmp_path):
    a = load_file(str(make_tiny(tmp_path / "a", seed=3) / "model.safetensors"))
    b = load_file(str(make_tiny(tmp_path / "b", seed=3) / "model.safetensors"))
    c = load_file(str(make_tiny(tmp_path / "c", seed=4) / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert (tmp_path / "a/tokenizer.json").read_text() == (tmp_path / "b/tokenizer.json").read_text()


def test_tokenizer_has_qwen_specials_and_chat_template(tiny_model_dir):
    _, processor = load_policy(ModelConfig(name_or_path=str(tiny_model_dir)))
    tok = processor.tokenizer
    for token in SPECIAL_TOKENS:
        ids = tok.encode(token, add_special_tokens=False)
        assert len(ids) == 1, token  # each special token is one id
    text = processor.render(MESSAGES)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What colour?<|im_end|>\n<|im_start|>assistant\n"
    )
    cont = processor.render(MESSAGES + [{"role": "assistant", "content": "<think>"}])
    assert cont.endswith("<|im_start|>assistant\n<think>")


def test_make_tiny_cli_and_builtin_preset(tmp_path, capsys, monkeypatch):
    """make-tiny writes a folder, or builds a builtin preset into the cache; loading a preset never builds it."""
    monkeypatch.setenv("GPG_VL_CACHE", str(tmp_path / "cache"))  # an empty cache, whatever ran before
    assert main(["make-tiny", str(tmp_path / "m"), "--arch", "qwen2_5_vl"]) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert "qwen2_5_vl" in capsys.readouterr().out
    with pytest.raises(ModelLoadError, match=r"builtin:tiny-qwen3_vl is not built yet .*gpg-vl make-tiny --builtin tiny-qwen3_vl"):
        load_policy(ModelConfig(name_or_path="builtin:tiny-qwen3_vl"))  # loading never builds
    assert main(["make-tiny", "--builtin", "tiny-qwen3_vl"]) == 0
    path = resolve_model_path("builtin:tiny-qwen3_vl")
    assert path in capsys.readouterr().out and build_builtin("builtin:tiny-qwen3_vl") == path  # built once, then cached
    assert main(["make-tiny"]) == 2 and "give either OUT" in capsys.readouterr().err
    for lookup in (resolve_model_path, build_builtin):
        with pytest.raises(ModelLoadError, match="builtin:tiny-warm"):
            lookup("builtin:huge")


def test_bad_model_paths_fail_clearly(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_policy(ModelConfig(name_or_path=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_policy(ModelConfig(name_or_path=str(tmp_path / "empty")))


# torchvision is hidden from transformers' availability check and from imports, as on a machine without it
NO_TORCHVISION = """
import importlib.util, sys
_find = importlib.util.find_spec
class _Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torchvision":
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, _Hide())
importlib.util.find_spec = lambda name, package=None: None if name.split(".")[0] == "torchvision" else _find(name, package)
from PIL import Image
from gpg_vl.config import ModelConfig
from gpg_vl.images import resize_messages
from gpg_vl.modeling import load_policy
from gpg_vl.tiny import make_tiny
folder = make_tiny(sys.argv[1])
model, processor = load_policy(ModelConfig(name_or_path=str(folder), min_pixels=3136, max_pixels=12544))
assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil", type(processor.image_processor)
msgs = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (64, 64))}, {"type": "text", "text": "hi"}]}]
out = model.generate(**processor([resize_messages(msgs, 3136, 12544)]), max_new_tokens=3)
assert "torchvision" not in sys.modules
print("ok")
"""


def test_works_without_torchvision(tmp_path):
    proc = subprocess.run([sys.executable, "-c", NO_TORCHVISION, str(tmp_path / "m")], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_pixel_budget_defaults_to_the_one_saved_with_the_model(tiny_model_dir, tmp_path):
    _, processor = load_policy(ModelConfig(name_or_path=str(tiny_model_dir)))
    assert (processor.min_pixels, processor.max_pixels) == (56 * 56, 112 * 112)  # the tiny kit's budget
    _, processor = load_policy(ModelConfig(name_or_path=str(tiny_model_dir), max_pixels=224 * 224))
    processor.save_pretrained(tmp_path)
    from gpg_vl.modeling import load_processor

    assert load_processor(tmp_path).max_pixels == 224 * 224  # checkpoints carry their budget
    image = processor.resize(MESSAGES)[0]["content"][0]["image"]
    assert image.size == (84, 56)  # 90x60 rounded to multiples of 28 inside the budget


def test_a_warm_preset_is_rebuilt_when_its_warm_up_changes(tmp_path, monkeypatch):
    """A cached warm preset is reused only if it was built with the same WarmUp (task, options, tokens);
    after a change, or from a folder with no record of its warm-up, it is built again (and until then
    `resolve_model_path` refuses the stale folder instead of loading it)."""
    import gpg_vl.tiny
    import gpg_vl.warmup
    from gpg_vl import builtin

    builds = []

    def fake_build(out_dir, **kwargs):
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text("{}")
        builds.append(kwargs.get("task_options") or kwargs.get("preset"))
        return out_dir

    monkeypatch.setenv("GPG_VL_CACHE", str(tmp_path))
    monkeypatch.setattr(gpg_vl.tiny, "make_tiny", fake_build)
    monkeypatch.setattr(gpg_vl.warmup, "make_format_warm", fake_build)
    monkeypatch.setitem(builtin.BUILTINS, "tiny-warm-x", ("qwen2_vl", "tiny", builtin.WarmUp("lisa", {"synthetic_easy": True})))
    folder = build_builtin("builtin:tiny-warm-x")
    assert build_builtin("builtin:tiny-warm-x") == folder and builds == ["tiny", {"synthetic_easy": True}]
    assert resolve_model_path("builtin:tiny-warm-x") == folder
    monkeypatch.setitem(builtin.BUILTINS, "tiny-warm-x", ("qwen2_vl", "tiny", builtin.WarmUp("lisa", {"synthetic_easy": False})))
    with pytest.raises(ModelLoadError, match="another warm-up"):
        resolve_model_path("builtin:tiny-warm-x")
    assert build_builtin("builtin:tiny-warm-x") == folder and builds[-1] == {"synthetic_easy": False}
    (Path(folder) / builtin.WARM_RECORD).unlink()  # a cache built before records existed
    build_builtin("builtin:tiny-warm-x")
    assert len(builds) == 4 and build_builtin("builtin:tiny-warm-x") == folder and len(builds) == 4
