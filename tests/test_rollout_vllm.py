"""The vLLM engine's pure helpers, without vLLM. The engine itself runs against the real vLLM (its CPU build, in
.venv-vllm) in tests/test_vllm_engine.py; one GPU test (generate, sync, log-probs follow the new weights) runs
where CUDA and vllm import (benchmarks/gpu_check.py runs it on the day a GPU is lent)."""

import importlib.util
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from gpg_vl.config import ModelConfig, RolloutConfig
from gpg_vl.images import smart_resize
from gpg_vl.modeling import load_policy
from gpg_vl.registry import get_task
from gpg_vl.rollout import SamplingParams, make_engine
from gpg_vl.rollout import vllm as vl

MIN_PX, MAX_PX = 3136, 12544
TOK_A, TOK_B, TOK_C = 10, 11, 12  # ordinary BPE tokens of the tiny vocabulary


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    cfg = ModelConfig(name_or_path=str(tiny_model_dir), min_pixels=MIN_PX, max_pixels=MAX_PX)
    model, processor = load_policy(cfg)
    return model, processor, cfg


def image_prompt(*sizes, text="Which colour?"):
    return [{"role": "user", "content": [*({"type": "image", "image": Image.new("RGB", s)} for s in sizes), {"type": "text", "text": text}]}]


# ---- requests -------------------------------------------------------------------------------------------


def test_requests_carry_resized_images_and_one_placeholder_per_image(policy):
    _, processor, _ = policy
    prompts = [image_prompt((60, 90)), image_prompt((200, 40), (30, 30)), [{"role": "user", "content": "no image"}]]
    requests = vl.build_requests(processor, prompts)
    one, two, text_only = requests
    h, w = smart_resize(90, 60, MIN_PX, MAX_PX)
    assert [im.size for im in one["multi_modal_data"]["image"]] == [(w, h)]  # resized by the training rule
    assert one["prompt"].count("<|image_pad|>") == 1  # unexpanded: vLLM expands it from the image
    assert one["prompt"] == processor.render(prompts[0])
    assert two["prompt"].count("<|image_pad|>") == 2 and len(two["multi_modal_data"]["image"]) == 2
    assert "multi_modal_data" not in text_only and "<|image_pad|>" not in text_only["prompt"]


def test_requests_refuse_more_images_than_the_engine_was_built_for(policy):
    _, processor, _ = policy
    with pytest.raises(ValueError, match="max_images_per_prompt"):
        vl.build_requests(processor, [image_prompt((56, 56), (56, 56))], max_images=1)


# ---- sampling parameters --------------------------------------------------------------------------------


def test_sampling_kwargs_suppress_vision_tokens_by_logit_bias_and_return_sampled_logprobs(policy):
    _, processor, _ = policy
    params = SamplingParams(n=4, temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=16, seed=3)
    kw = vl.build_sampling_kwargs(params, processor.suppressed_token_ids, processor.eos_token_ids)
    assert kw["logit_bias"] == {i: vl.SUPPRESS_BIAS for i in processor.suppressed_token_ids}
    assert kw["logit_bias"] and all(v <= -100 for v in kw["logit_bias"].values())
    assert kw["logprobs"] == 0 and kw["stop_token_ids"] == processor.eos_token_ids
    assert (kw["n"], kw["temperature"], kw["top_p"], kw["top_k"], kw["max_tokens"]) == (4, 0.7, 0.9, 0, 16)
    assert "seed" not in kw  # per request, from request_seeds
    assert vl.build_sampling_kwargs(SamplingParams(top_k=-1), [], [])["top_k"] == 0


def test_greedy_asks_for_one_sample_per_request():
    kw = vl.build_sampling_kwargs(SamplingParams(n=3, temperature=0.0, top_p=0.5, top_k=7), [1], [2])
    assert (kw["n"], kw["temperature"], kw["top_p"], kw["top_k"]) == (1, 0.0, 1.0, 0)  # vLLM rejects greedy n>1


def test_request_seeds_give_every_sample_its_own_stream():
    # vLLM seeds sample k of a request with seed + k: prompts spaced n apart never share a stream
    seeds = vl.request_seeds(SamplingParams(n=4, seed=100), 3)
    assert seeds == [100, 104, 108]
    streams = [s + k for s in seeds for k in range(4)]
    assert len(set(streams)) == 12
    assert vl.request_seeds(SamplingParams(n=4), 2) == [None, None]


# ---- outputs -> Rollout ---------------------------------------------------------------------------------


def completion(index, ids, lps, finish, text="", extra=None):
    # vLLM's per-step dict holds the sampled token and, with logprobs=k>0, the top-k; Logprob has .logprob
    steps = [{tok: SimpleNamespace(logprob=lp), **(extra or {})} for tok, lp in zip(ids, lps)]
    return SimpleNamespace(index=index, token_ids=ids, logprobs=steps, text=text, finish_reason=finish)


def test_outputs_become_a_group_contiguous_rollout_with_eos_inclusive_masks():
    eos, pad = [505, 506], 506
    outputs = [
        SimpleNamespace(outputs=[  # out of order on purpose: .index decides
            completion(1, [TOK_B, TOK_C, TOK_A], [-0.5, -0.6, -0.7], "length", "b"),
            completion(0, [TOK_A, 505], [-0.1, -0.2], "stop", "a", extra={TOK_C: SimpleNamespace(logprob=-9.0)}),
        ]),
        SimpleNamespace(outputs=[
            completion(0, [506], [-0.3], "stop", ""),
            completion(1, [TOK_A, 505, TOK_B], [-0.4, -0.5, -0.6], "stop", "x"),  # tokens after EOS are not response
        ]),
    ]
    r = vl.outputs_to_rollout(outputs, n=2, pad_id=pad, eos_ids=eos)
    assert r.prompt_indices == [0, 0, 1, 1]
    assert r.completion_ids.tolist() == [[TOK_A, 505, pad], [TOK_B, TOK_C, TOK_A], [506, pad, pad], [TOK_A, 505, pad]]
    assert r.response_mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]]
    torch.testing.assert_close(r.logprobs, torch.tensor([[-0.1, -0.2, 0], [-0.5, -0.6, -0.7], [-0.3, 0, 0], [-0.4, -0.5, 0]]))
    assert r.finish_reasons == ["stop", "length", "stop", "stop"]
    assert r.texts == ["a", "b", "", "x"]
    decoded = vl.outputs_to_rollout(outputs, 2, pad, eos, decode=lambda ids: ",".join(map(str, ids)))
    assert decoded.texts[0] == f"{TOK_A},505"  # the engine decodes with the processor, like the HF engine


def test_greedy_copies_fold_back_into_groups():
    outs = [SimpleNamespace(outputs=[completion(0, [TOK_A, 505], [0.0, 0.0], "stop")]) for _ in range(6)]
    assert vl.outputs_to_rollout(outs, n=3, pad_id=0, eos_ids=[505]).prompt_indices == [0, 0, 0, 1, 1, 1]


def test_outputs_without_logprobs_fail_loudly():
    out = SimpleNamespace(outputs=[SimpleNamespace(index=0, token_ids=[TOK_A], logprobs=None, text="", finish_reason="length")])
    with pytest.raises(ValueError, match="logprobs=0"):
        vl.outputs_to_rollout([out], 1, 0, [505])


# ---- weights, config, environment -----------------------------------------------------------------------


def test_hf_names_are_the_ones_vllms_qwen2vl_mapper_knows(policy):
    model, _, _ = policy
    names = [n for n, _ in vl.hf_to_vllm_weights(model.named_parameters())]
    assert names == [n for n, _ in model.named_parameters()]  # transformers 5 names pass through unchanged
    assert all(n.startswith(("model.language_model.", "model.visual.", "lm_head.")) for n in names)
    wrapped = [
        ("module._orig_mod.model.visual.blocks.0.attn.qkv.weight", torch.ones(1, requires_grad=True)),
        ("model.language_model.layers.0._checkpoint_wrapped_module.mlp.submodule.weight", torch.ones(1)),
    ]
    (name, t), (inner, _) = vl.hf_to_vllm_weights(wrapped)
    assert name == "model.visual.blocks.0.attn.qkv.weight" and not t.requires_grad
    assert inner == "model.language_model.layers.0.mlp.submodule.weight"
    sharded = torch.nn.Parameter(torch.empty(0))
    sharded.ds_id = 0
    with pytest.raises(NotImplementedError, match="ZeRO-3"):
        list(vl.hf_to_vllm_weights([("lm_head.weight", sharded)]))


def test_version_range():
    assert vl.version_supported("0.20.0") and vl.version_supported("0.33.0") and vl.version_supported("0.25.1.dev3+gabc")
    assert not vl.version_supported("0.19.1") and not vl.version_supported("0.34.0")


def test_llm_kwargs_colocate_in_process_and_pass_the_pixel_budget():
    cfg = ModelConfig()  # min/max_pixels None: the budget comes from the processor, never from here
    rollout = RolloutConfig(vllm_gpu_memory_utilization=0.25, batch_size=32)
    kw = vl.build_llm_kwargs("/m", rollout, cfg, (MIN_PX, MAX_PX), 2, False, {"enforce_eager": True}, max_model_len=2100)
    assert kw["mm_processor_kwargs"] == {"min_pixels": MIN_PX, "max_pixels": MAX_PX}
    assert kw["limit_mm_per_prompt"] == {"image": 2, "video": 0} and kw["gpu_memory_utilization"] == 0.25 and kw["max_num_seqs"] == 32
    assert kw["distributed_executor_backend"] == "external_launcher" and kw["logprobs_mode"] == "processed_logprobs"
    assert kw["dtype"] == "bfloat16" and kw["enforce_eager"] is True and kw["max_model_len"] == 2100
    assert "kv_cache_memory_bytes" not in kw and "enable_chunked_prefill" not in kw


def test_on_the_cpu_the_kv_cache_is_what_the_batch_needs_and_prompts_prefill_whole():
    kw = vl.build_llm_kwargs("/m", RolloutConfig(batch_size=8), ModelConfig(), (MIN_PX, MAX_PX), 1, False, on_cpu=True,
                             max_model_len=9000, kv_bytes=123)
    assert kw["dtype"] == "float32"  # `auto` trains fp32 weights on the CPU (no autocast there)
    assert kw["kv_cache_memory_bytes"] == 123 and "gpu_memory_utilization" not in kw
    assert kw["enable_chunked_prefill"] is False and kw["max_num_batched_tokens"] == 9000


def test_kv_cache_bytes_count_keys_and_values_of_every_layer():
    text = SimpleNamespace(num_hidden_layers=4, num_key_value_heads=1, hidden_size=96, num_attention_heads=3)
    # 2 (K and V) x 4 layers x 1 KV head x 32 head dim x 4 bytes = 1 KiB per token
    assert vl.kv_cache_bytes(text, max_model_len=100, max_num_seqs=8, dtype=torch.float32) == 1024 * 100 * 8


def test_max_model_len_is_the_prompt_budget_plus_the_longest_completion(policy):
    _, processor, _ = policy  # 12544 px at 28 px per merged token: 16 image tokens per image
    assert vl.max_model_len_for(processor, max_images=2, max_new_tokens=24) == vl.PROMPT_TEXT_TOKENS + 2 * 16 + 24


def test_parity_check_names_the_prompt_and_both_counts(policy):
    _, processor, _ = policy
    prompts = [image_prompt((56, 56)), image_prompt((112, 112))]
    ids = []
    for p in prompts:
        enc = processor([processor.resize(p)])
        ids.append(enc["input_ids"][0].tolist())
    vl.check_prompt_parity(processor, prompts, ids)  # the HF ids themselves pass
    image = processor.image_token_id
    fewer = [ids[0], [t for k, t in enumerate(ids[1]) if not (t == image and k % 2)]]  # half the image tokens
    with pytest.raises(vl.PromptParityError, match=rf"prompt 1: vLLM built {len(fewer[1])} prompt tokens \(8 image tokens\), the HF processor {len(ids[1])} \(16 image tokens\)"):
        vl.check_prompt_parity(processor, prompts, fewer)


def test_launcher_env_is_filled_for_one_call_and_removed_after(monkeypatch):
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")  # the user's value wins
    with vl.launcher_env(local_rank=1):
        assert os.environ["RANK"] == "0" and os.environ["LOCAL_RANK"] == "1" and int(os.environ["MASTER_PORT"]) > 0
        assert os.environ["MASTER_ADDR"] == "10.0.0.1"
    assert "RANK" not in os.environ and "MASTER_PORT" not in os.environ and os.environ["MASTER_ADDR"] == "10.0.0.1"


def test_without_vllm_the_engine_says_how_to_install_it(policy, monkeypatch):
    model, processor, cfg = policy
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'gpg-vl\[vllm\]' on a CUDA machine"):
        make_engine("vllm", model, processor, RolloutConfig(), cfg)


# ---- the real thing, where CUDA and vllm exist -----------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and importlib.util.find_spec("vllm")), reason="needs CUDA and vllm")
def test_vllm_generates_and_follows_synced_weights(tiny_model_dir):
    from gpg_vl.logprobs import compute_token_logprobs

    cfg = ModelConfig(name_or_path=str(tiny_model_dir), min_pixels=MIN_PX, max_pixels=MAX_PX)  # bfloat16 on CUDA
    model, processor = load_policy(cfg, "cuda")
    engine = make_engine("vllm", model, processor, RolloutConfig(vllm_gpu_memory_utilization=0.2, batch_size=16), cfg)
    task = get_task("shapes")
    prompts = [task.messages(e) for e in task.load("synthetic:3", "train")]
    params = SamplingParams(n=2, max_new_tokens=12, seed=0)

    def teacher_forced(r):
        batch = [processor.resize(prompts[i]) for i in r.prompt_indices]
        with torch.no_grad():
            inputs = processor(batch).to("cuda")
            return compute_token_logprobs(model, inputs, r.completion_ids, r.response_mask, 1.0, processor.suppressed_token_ids).cpu()

    r = engine.generate(prompts, params)
    assert r.prompt_indices == [0, 0, 1, 1, 2, 2]
    mask = r.response_mask.bool()
    assert not any(int(t) in set(processor.suppressed_token_ids) for t in r.completion_ids[mask])
    assert (r.logprobs[~mask] == 0).all() and (r.logprobs[mask] <= 0).all()
    assert (r.logprobs - teacher_forced(r))[mask].abs().mean() < 0.1  # bf16 kernels differ a little

    old = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():  # near-uniform random logits become peaked: every log-prob moves by far more than 0.1
        emb = model.get_input_embeddings().weight
        emb.add_(torch.randn_like(emb))
    engine.sync_weights(model)
    r_new = engine.generate(prompts, params)
    mask = r_new.response_mask.bool()
    new_forward = teacher_forced(r_new)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(old[n])
    old_forward = teacher_forced(r_new)
    assert (r_new.logprobs - new_forward)[mask].abs().mean() < 0.1  # vLLM scores with the synced weights
    assert (r_new.logprobs - old_forward)[mask].abs().mean() > 1.0  # ... and not with the old ones
    del engine
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # the external launcher brought it up in this process
