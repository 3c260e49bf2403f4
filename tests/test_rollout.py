"""The HF rollout engine: group layout, EOS-inclusive masks, suppressed vision tokens, and log-probs that
match a teacher-forced forward (the M-RoPE positions of generation and training line up)."""

import pytest
import torch

from gpg_vl.config import ModelConfig
from gpg_vl.logprobs import compute_token_logprobs
from gpg_vl.modeling import load_policy
from gpg_vl.rollout import SamplingParams, make_engine
from gpg_vl.config import RolloutConfig
from gpg_vl.images import resize_messages
from gpg_vl.registry import get_task


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    cfg = ModelConfig(name_or_path=str(tiny_model_dir), min_pixels=3136, max_pixels=12544)
    model, processor = load_policy(cfg)
    engine = make_engine("hf", model, processor, RolloutConfig(batch_size=5), cfg)
    task = get_task("shapes")
    prompts = [task.messages(e) for e in task.load("synthetic:3", "train")]
    # different image sizes in one batch exercise left padding
    prompts[1][0]["content"][0]["image"] = prompts[1][0]["content"][0]["image"].resize((60, 90))
    return model, processor, engine, prompts


def test_groups_masks_and_suppressed_tokens(setup):
    model, processor, engine, prompts = setup
    r = engine.generate(prompts, SamplingParams(n=4, max_new_tokens=16, seed=0))
    assert r.prompt_indices == [0] * 4 + [1] * 4 + [2] * 4
    assert r.completion_ids.shape[0] == 12 and r.logprobs.shape == r.response_mask.shape
    eos = set(processor.eos_token_ids)
    for ids, mask, finish in zip(r.completion_ids, r.response_mask, r.finish_reasons):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # a prefix mask
        if finish == "stop":
            assert int(ids[n - 1]) in eos  # ... that ends at and includes EOS
        else:
            assert n == 16
    vision = {processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>")}
    assert not any(int(t) in vision for t in r.completion_ids[r.response_mask.bool()])
    assert (r.logprobs[r.response_mask == 0] == 0).all() and (r.logprobs[r.response_mask.bool()] <= 0).all()


def test_sampled_logprobs_match_teacher_forcing(setup):
    model, processor, engine, prompts = setup
    for temperature in (1.0, 0.7):
        r = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=12, temperature=temperature, seed=1))
        batch = [resize_messages(prompts[i], 3136, 12544) for i in r.prompt_indices]
        with torch.no_grad():
            forward = compute_token_logprobs(model, processor(batch), r.completion_ids, r.response_mask, temperature, processor.suppressed_token_ids)
        torch.testing.assert_close(forward, r.logprobs, atol=1e-4, rtol=1e-4)


def test_seed_reproduces_and_greedy_is_deterministic(setup):
    _, _, engine, prompts = setup
    a = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=8, seed=5)).texts
    b = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=8, seed=5)).texts
    assert a == b
    g1 = engine.generate(prompts, SamplingParams(n=1, temperature=0, max_new_tokens=8, seed=1)).texts
    g2 = engine.generate(prompts, SamplingParams(n=1, temperature=0, max_new_tokens=8, seed=2)).texts
    assert g1 == g2


def test_unknown_engine_lists_valid_ones(setup):
    model, processor, _, _ = setup
    with pytest.raises(KeyError, match="hf, vllm"):
        make_engine("sglang", model, processor, RolloutConfig(), ModelConfig())
