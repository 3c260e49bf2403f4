"""The real-scale options on the tiny model: LoRA (merged checkpoints, exact resume), a frozen vision tower,
gradient checkpointing, bf16 weights, the flash-attention fallback, the 8-bit optimizer's error, the
2b-shape preset's real vocabulary and ids, and the start-up parameter line."""

import math
import warnings

import pytest
import torch
from transformers import AutoModelForImageTextToText

from gpg_vl.cli import main
from gpg_vl.config import LoraConfig, ModelConfig
from gpg_vl.logprobs import compute_token_logprobs
from gpg_vl.modeling import describe_parameters, load_policy, resolve_attn_implementation, vision_tower
from conftest import args_for, rows, weights

LORA = ["model.lora={r: 4, alpha: 8}"]


def _batch(processor, n=2):
    from gpg_vl.registry import get_task

    task = get_task("shapes")
    examples = task.load("synthetic:4", "train")[:n]
    prompts = [processor.resize(task.messages(e)) for e in examples]
    completion = processor.tokenizer(["<think>a</think><answer>(A)</answer>"] * n, return_tensors="pt")["input_ids"]
    return processor(prompts), completion, torch.ones(completion.shape, dtype=torch.float32)


def test_lora_trains_only_adapters_and_saves_merged_weights(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "lora"
    assert main(args_for(tiny_model_dir, out, *LORA)) == 0
    assert "trainable of" in capsys.readouterr().out  # the start-up parameter line
    assert all(math.isfinite(r["loss"]) for r in rows(out))
    before, after = weights(tiny_model_dir), weights(out / "checkpoint-2")
    assert set(before) == set(after), "merged checkpoint has the plain model's parameter names"
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # adapters sit on the language model's projections only: exactly those weights moved, nothing else
    targets = LoraConfig().target_modules
    assert changed and all(any(f".{t}." in k for t in targets) for k in changed)
    assert not any("visual" in k or "embed" in k or "norm" in k for k in changed)
    # the folder loads with plain from_pretrained (no peft) and matches the adapted policy's output
    cfg = ModelConfig(name_or_path=str(tiny_model_dir), lora=LoraConfig(r=4, alpha=8))
    policy, processor = load_policy(cfg)
    from gpg_vl.lora import load_adapter_state_dict

    load_adapter_state_dict(policy, torch.load(out / "checkpoint-2" / "trainer_state.pt", weights_only=False)["adapter"])
    plain = AutoModelForImageTextToText.from_pretrained(out / "checkpoint-2")
    inputs, completion, mask = _batch(processor)
    policy.eval()
    a = compute_token_logprobs(policy, inputs, completion, mask)
    b = compute_token_logprobs(plain, inputs, completion, mask)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_lora_resume_equals_an_uninterrupted_run(tiny_model_dir, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = [*LORA, "checkpoint.save_every=2"]
    assert main(args_for(tiny_model_dir, straight, *common, "train.max_steps=4")) == 0
    assert main(args_for(tiny_model_dir, split, *common, "train.max_steps=2")) == 0
    assert main(args_for(tiny_model_dir, split, *common, "train.max_steps=4", "--resume")) == 0
    a, b = weights(straight / "checkpoint-4"), weights(split / "checkpoint-4")
    assert all(torch.equal(a[k], b[k]) for k in a), "LoRA resume must reproduce the uninterrupted run bit for bit"


def test_frozen_vision_tower_is_bit_identical_after_a_step(tiny_model_dir, tmp_path):
    out = tmp_path / "frozen"
    assert main(args_for(tiny_model_dir, out, "model.freeze_vision=true")) == 0
    before, after = weights(tiny_model_dir), weights(out / "checkpoint-2")
    vision = [k for k in before if "visual" in k and "merger" not in k]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)
    assert any(not torch.equal(before[k], after[k]) for k in before if "visual" not in k)
    # bug 12: the merger (the ViT's projection into the language model) trains, as the option says
    assert all(not torch.equal(before[k], after[k]) for k in before if "merger" in k and k.endswith("weight"))


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir):
    grads = []
    for checkpointing in (False, True):
        model, processor = load_policy(ModelConfig(name_or_path=str(tiny_model_dir), gradient_checkpointing=checkpointing))
        model.train()
        inputs, completion, mask = _batch(processor)
        logprobs = compute_token_logprobs(model, inputs, completion, mask)
        logprobs.sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    plain, recomputed = grads
    assert plain.keys() == recomputed.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_bfloat16_weights_train_in_bfloat16(tiny_model_dir, tmp_path):
    out = tmp_path / "bf16"
    assert main(args_for(tiny_model_dir, out, "model.dtype=bfloat16")) == 0
    after = weights(out / "checkpoint-2")
    assert {t.dtype for t in after.values()} == {torch.bfloat16}
    state = torch.load(out / "checkpoint-2" / "trainer_state.pt", weights_only=False)
    moments = [s["exp_avg"] for s in state["optimizer"]["state"].values()]
    assert moments and all(m.dtype == torch.bfloat16 for m in moments)  # optimizer state in the weights' dtype


def test_flash_attention_falls_back_to_sdpa_with_a_warning():
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert resolve_attn_implementation("flash_attention_2") == "sdpa"
    assert len(seen) == 1 and "flash-attn is not installed" in str(seen[0].message)
    assert resolve_attn_implementation("eager") == "eager"


def test_eight_bit_adam_is_a_one_line_error_without_cuda(tiny_model_dir, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert main(args_for(tiny_model_dir, tmp_path / "x", "optim.name=adamw_8bit")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "adamw_8bit" in err and "CUDA" in err
    assert not (tmp_path / "x").exists()  # failed before anything was loaded or written


def test_describe_parameters_counts_trainable_and_total(tiny_model_dir):
    model, _ = load_policy(ModelConfig(name_or_path=str(tiny_model_dir), freeze_vision=True))
    total = sum(p.numel() for p in model.parameters())
    frozen = sum(p.numel() for p in vision_tower(model).parameters()) - sum(p.numel() for p in vision_tower(model).merger.parameters())
    line = describe_parameters(model, "adamw")
    assert f"{(total - frozen) / 1e6:,.2f}M trainable of {total / 1e6:,.2f}M" in line
    assert "weights float32" in line and "float32 state" in line


def test_2b_shape_tokenizer_has_qwens_special_ids_and_real_vocabulary():
    from gpg_vl.tiny import PRESETS, build_model_config, build_tokenizer

    tokenizer = build_tokenizer(PRESETS["2b-shape"].vocab_size, qwen_ids=True)
    # Qwen2-VL's own tokenizer ids (tokenizer_config.json of Qwen/Qwen2-VL-2B-Instruct)
    expected = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
                "<|vision_end|>": 151653, "<|image_pad|>": 151655, "<|video_pad|>": 151656}
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in expected} == expected
    text = "<|im_start|>user\nwhat colour?<|im_end|>"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    config = build_model_config("qwen2_vl", PRESETS["2b-shape"], tokenizer)
    t, v = config.text_config, config.vision_config
    # Qwen2-VL-2B-Instruct's config.json, but 2 layers each side
    assert (t.vocab_size, t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.intermediate_size) == (151936, 1536, 12, 2, 8960)
    assert (v.embed_dim, v.num_heads, v.mlp_ratio, v.patch_size, v.spatial_merge_size, v.hidden_size) == (1280, 16, 4, 14, 2, 1536)
    assert (t.num_hidden_layers, v.depth) == (2, 2) and config.tie_word_embeddings
    assert (config.image_token_id, config.vision_start_token_id) == (151655, 151652)


def test_rollout_engines_receive_merged_lora_weights_under_the_plain_names(tiny_model_dir):
    import copy

    from gpg_vl.lora import merged_parameters

    plain, _ = load_policy(ModelConfig(name_or_path=str(tiny_model_dir)))
    policy, _ = load_policy(ModelConfig(name_or_path=str(tiny_model_dir), lora=LoraConfig(r=4, alpha=8)))
    torch.manual_seed(0)
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            p.data.normal_()  # fresh adapters are zero; make them count
    merged = dict(merged_parameters(policy))
    assert list(merged) == [n for n, _ in plain.named_parameters()]  # the names vLLM's loader maps
    reference = dict(copy.deepcopy(policy).merge_and_unload().named_parameters())  # peft's own merge
    for name, value in merged.items():
        torch.testing.assert_close(value, reference[name], msg=name)
    assert any(not torch.equal(merged[n], p) for n, p in plain.named_parameters())


def test_fsdp_on_one_process_is_a_one_line_error(tiny_model_dir, tmp_path, capsys):
    assert main(args_for(tiny_model_dir, tmp_path / "x", "train.sharding=fsdp")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.sharding=fsdp needs several processes" in err
