"""Group attention (`gpg_vl.group_attention`): attending over each prompt's keys once per group plus the row's
own completion gives the same result as sdpa over every row's full copy of prompt + completion; the static
decode loop uses it on the CPU in float32 and its texts and draws equal the dynamic loop's; the model's own
attention comes back after the block."""

import copy
import types

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from gpg_vl import group_attention as ga
from gpg_vl.rollout import SamplingParams
from gpg_vl.rollout.hf import HFEngine


def _full_copy_attention(query, prompt_keys, prompt_values, pad, own_keys, own_values, G):
    """The reference: every row holds its prompt's keys/values and its completion's; sdpa with the padding masked."""
    keys = torch.cat([prompt_keys.repeat_interleave(G, 0), own_keys], dim=2)
    values = torch.cat([prompt_values.repeat_interleave(G, 0), own_values], dim=2)
    mask = torch.cat([pad.repeat_interleave(G, 0), torch.ones(own_keys.shape[0], own_keys.shape[2], dtype=torch.bool)], 1)
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask[:, None, None, :], enable_gqa=True)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from gpg_vl.config import ModelConfig
    from gpg_vl.modeling import load_policy

    return load_policy(ModelConfig(name_or_path=str(tiny_model_dir), min_pixels=3136, max_pixels=12544))


@pytest.mark.parametrize("every_slot", [False, True], ids=["slots-so-far", "every-slot-masked"])
@pytest.mark.parametrize("heads,kv_heads,group", [(6, 2, 8), (4, 4, 3), (3, 1, 1)])
def test_group_attention_equals_sdpa_over_every_rows_full_cache(tiny, heads, kv_heads, group, every_slot):
    # both ways of reading the completion: slots [0, step] (eager), or every slot with the unwritten ones masked
    # (a compiled step's fixed shapes; the unwritten slots hold random values here, as a reused cache would)
    model, _ = tiny
    module = model.get_decoder().layers[0].self_attn  # its config and layer index; the heads come from the tensors
    g = torch.Generator().manual_seed(heads * 10 + group)
    B, P, D, slots = 3, 11, 16, 8
    N = B * group
    pad = torch.ones(B, P, dtype=torch.long)
    pad[0, :4] = 0  # left padding of different lengths
    pad[2, :1] = 0
    prompt_keys, prompt_values = (torch.randn(B, kv_heads, P, D, generator=g) for _ in range(2))
    cache = types.SimpleNamespace(layers=[types.SimpleNamespace(keys=prompt_keys, values=prompt_values)])
    prompt = ga.GroupPrompt.from_prefill(cache, pad, group, torch.float32)
    own_keys, own_values = (torch.randn(N, kv_heads, slots, D, generator=g) for _ in range(2))  # past `step`: unwritten
    if every_slot:
        prompt.written = torch.full((1, 1, 1, slots), float("-inf"))
    with ga.group_decode(model, prompt):
        for step in range(slots):
            prompt.open_slot(step)
            if step not in (0, 3, slots - 1):
                continue
            query = torch.randn(N, heads, 1, D, generator=g)
            out, weights = ga.group_attention(module, query, own_keys, own_values, None, scaling=D**-0.5)
            done = step + 1
            expected = _full_copy_attention(query, prompt_keys, prompt_values, pad.bool(), own_keys[:, :, :done], own_values[:, :, :done], group)
            assert out.shape == (N, 1, heads, D) and weights is None
            torch.testing.assert_close(out, expected.transpose(1, 2), atol=2e-6, rtol=1e-5)


def test_group_decode_gives_the_models_attention_back_even_on_an_error(tiny):
    model, _ = tiny
    text = model.config.get_text_config()
    before = text._attn_implementation
    module = model.get_decoder().layers[0].self_attn
    assert module.config is text  # the attention modules read the config group_decode switches
    prompt = ga.GroupPrompt(keys=[], values=[], bias=torch.zeros(1, 1, 1, 1), group_size=1)
    with pytest.raises(RuntimeError, match="inside"):
        with ga.group_decode(model, prompt):
            assert text._attn_implementation == ga.ATTENTION
            assert model.config.vision_config._attn_implementation == before  # the vision tower is left alone
            raise RuntimeError("inside")
    assert text._attn_implementation == before and not ga._ACTIVE
    with pytest.raises(RuntimeError, match="only inside"):  # registered, but nothing to read outside the block
        ga.group_attention(module, torch.zeros(1, 4, 1, 24), torch.zeros(1, 2, 4, 24), torch.zeros(1, 2, 4, 24), None)


def test_static_decode_reads_prompts_through_group_attention_and_equals_dynamic(tiny, monkeypatch):
    # every decode forward of the static loop goes through group attention, and its draws equal the dynamic loop's
    from gpg_vl.registry import get_task

    model, processor = tiny
    task = get_task("shapes")
    prompts = [task.messages(e) for e in task.load("synthetic:3", "train")]
    prompts[1][0]["content"][0]["image"] = prompts[1][0]["content"][0]["image"].resize((60, 90))  # left padding
    calls = []
    real = AttentionInterface._global_mapping[ga.ATTENTION]
    monkeypatch.setitem(AttentionInterface._global_mapping, ga.ATTENTION, lambda *a, **k: calls.append(1) or real(*a, **k))
    assert ga.group_decode_applies(model)
    params = SamplingParams(n=4, max_new_tokens=9, seed=5)
    static = HFEngine(model, processor, batch_size=12, decode="static").generate(prompts, params)
    assert len(calls) == model.config.get_text_config().num_hidden_layers * (static.completion_ids.shape[1] - 1)
    dynamic = HFEngine(model, processor, batch_size=12, decode="dynamic").generate(prompts, params)
    assert static.texts == dynamic.texts and torch.equal(static.completion_ids, dynamic.completion_ids)
    torch.testing.assert_close(static.logprobs, dynamic.logprobs, atol=1e-5, rtol=1e-5)
    assert model.config.get_text_config()._attn_implementation == "sdpa"


def test_group_attention_applies_on_the_cpu_in_float32_only(tiny):
    model, _ = tiny
    assert ga.group_decode_applies(model)
    assert not ga.group_decode_applies(copy.deepcopy(model).to(torch.bfloat16))
