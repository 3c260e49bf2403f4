"""The HF rollout engine, on both paths (shared prompt prefix and per-row `generate`): group layout,
EOS-inclusive masks, suppressed vision tokens, log-probs that match a teacher-forced forward (the M-RoPE
positions of generation and training line up), identical greedy texts, and no vocabulary-sized buffers."""

import copy

import pytest
import torch

from gpg_vl.config import ModelConfig
from gpg_vl.logprobs import compute_token_logprobs
from gpg_vl.modeling import load_policy
from gpg_vl.rollout import SamplingParams, make_engine
from gpg_vl.config import RolloutConfig
from gpg_vl.images import resize_messages
from gpg_vl.registry import get_task
from gpg_vl.rollout.hf import HFEngine


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


@pytest.fixture(params=["shared", "per_row"])
def engines(request, setup):
    """The setup with the engine on one path: shared prompt prefix (default) or per-row `generate`."""
    model, processor, engine, prompts = setup
    return model, processor, HFEngine(model, processor, batch_size=5, share_prefix=request.param == "shared"), prompts


def test_groups_masks_and_suppressed_tokens(engines):
    model, processor, engine, prompts = engines
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


def test_sampled_logprobs_match_teacher_forcing(engines):
    model, processor, engine, prompts = engines
    for temperature in (1.0, 0.7):
        r = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=12, temperature=temperature, seed=1))
        batch = [resize_messages(prompts[i], 3136, 12544) for i in r.prompt_indices]
        with torch.no_grad():
            forward = compute_token_logprobs(model, processor(batch), r.completion_ids, r.response_mask, temperature, processor.suppressed_token_ids)
        torch.testing.assert_close(forward, r.logprobs, atol=1e-4, rtol=1e-4)


def test_seed_reproduces_and_greedy_is_deterministic(engines):
    _, _, engine, prompts = engines
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


def test_shared_prefix_greedy_texts_equal_generate(setup):
    model, processor, _, prompts = setup
    # the random tiny model greedily repeats one token; larger weights make texts differ per prompt and step,
    # so a wrong position or a wrong cache row changes them
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    greedy = SamplingParams(n=3, temperature=0, max_new_tokens=12)
    shared = HFEngine(model, processor, batch_size=4, share_prefix=True).generate(prompts, greedy)
    per_row = HFEngine(model, processor, batch_size=4, share_prefix=False).generate(prompts, greedy)
    assert len(set(shared.texts)) == 3  # one text per prompt, different between prompts
    assert shared.texts == per_row.texts and shared.prompt_indices == per_row.prompt_indices
    assert torch.equal(shared.completion_ids, per_row.completion_ids)
    torch.testing.assert_close(shared.logprobs, per_row.logprobs, atol=1e-5, rtol=1e-5)


def test_no_vocabulary_sized_buffers_are_requested(setup, monkeypatch):
    # generate must not be asked for per-step score/logit rows ([N, L, V] in all); the shared path never calls it
    model, processor, _, prompts = setup
    calls = []
    real = model.generate

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    params = SamplingParams(n=2, max_new_tokens=6, seed=0)
    HFEngine(model, processor, share_prefix=False).generate(prompts, params)
    assert calls and not any(k.get(flag) for k in calls for flag in ("output_scores", "output_logits"))
    calls.clear()
    r = HFEngine(model, processor, share_prefix=True).generate(prompts, params)
    assert not calls and r.logprobs.shape == r.completion_ids.shape
