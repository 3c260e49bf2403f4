"""The selective log-softmax (LM head per chunk of completion tokens) against the straightforward full
[N, L, V] log-softmax it replaced: same log-probs and same parameter gradients within 1e-5, on Qwen2-VL,
Qwen2.5-VL and Qwen3-VL, with temperature != 1, banned ids, left padding and completions of different lengths."""

import pytest
import torch

from gpg_vl.config import ModelConfig
from gpg_vl.logprobs import compute_token_logprobs, logprobs_from_hidden
from gpg_vl.modeling import load_policy
from gpg_vl.registry import get_task
from gpg_vl.tiny import make_tiny


def full_softmax_logprobs(model, prompt_inputs, completion_ids, response_mask, temperature, suppressed_ids):
    """The previous implementation, kept as the reference: float32 [N, L, V] logits and a full log_softmax."""
    L = completion_ids.shape[1]
    inputs = dict(prompt_inputs)
    inputs["input_ids"] = torch.cat([prompt_inputs["input_ids"], completion_ids], 1)
    inputs["attention_mask"] = torch.cat([prompt_inputs["attention_mask"], response_mask.long()], 1)
    inputs["mm_token_type_ids"] = torch.cat([prompt_inputs["mm_token_type_ids"], torch.zeros_like(completion_ids)], 1)
    logits = model(**inputs, use_cache=False, logits_to_keep=L + 1).logits[:, :-1].float()
    logits[..., suppressed_ids] = float("-inf")
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, -1).gather(-1, completion_ids[..., None]).squeeze(-1) * response_mask


def batch(processor, n_prompts=3, seed=0):
    """Left-padded prompts of different image sizes, and random completions of lengths 1..L."""
    task = get_task("shapes")
    prompts = [task.messages(e) for e in task.load(f"synthetic:{n_prompts}", "train")]
    prompts[1][0]["content"][0]["image"] = prompts[1][0]["content"][0]["image"].resize((60, 90))
    inputs = processor([processor.resize(p) for p in prompts])
    g = torch.Generator().manual_seed(seed)
    L = 7
    banned = set(processor.suppressed_token_ids)
    allowed = torch.tensor([i for i in range(len(processor.tokenizer)) if i not in banned])
    completion_ids = allowed[torch.randint(len(allowed), (n_prompts, L), generator=g)]
    lengths = torch.tensor([L, 3, 1])[:n_prompts]
    mask = (torch.arange(L)[None] < lengths[:, None]).float()
    completion_ids = torch.where(mask.bool(), completion_ids, processor.pad_token_id)
    return inputs, completion_ids, mask


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def policy(request, tmp_path_factory):
    folder = make_tiny(tmp_path_factory.mktemp(request.param) / "m", arch=request.param, seed=0)
    return load_policy(ModelConfig(name_or_path=str(folder), min_pixels=3136, max_pixels=12544))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_selective_logprobs_and_gradients_equal_the_full_log_softmax(policy, temperature):
    model, processor = policy
    inputs, completion_ids, mask = batch(processor)
    banned = processor.suppressed_token_ids
    results = []
    for fn in (full_softmax_logprobs, compute_token_logprobs):
        model.zero_grad(set_to_none=True)
        logprobs = fn(model, inputs, completion_ids, mask, temperature, banned)
        (logprobs * torch.linspace(-1, 2, logprobs.numel()).view_as(logprobs)).sum().backward()  # weights of both signs
        results.append((logprobs.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (ref, ref_grads), (new, new_grads) = results
    assert (new[mask == 0] == 0).all()
    torch.testing.assert_close(new, ref, rtol=1e-5, atol=1e-5)
    assert ref_grads.keys() == new_grads.keys() and len(new_grads) == len(list(model.parameters()))
    for name in ref_grads:
        # relative to the tensor's largest entry: elementwise, float32 summation order alone moves tiny entries ~1e-4
        scale = ref_grads[name].abs().max()
        assert (new_grads[name] - ref_grads[name]).abs().max() <= 1e-5 * scale, name


def test_chunking_does_not_change_the_result():
    # 2 rows x 5 tokens split into chunks of 3 tokens: the same numbers as one chunk, and padding stays 0
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    ids = torch.randint(11, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.float)
    one = logprobs_from_hidden(head, hidden, ids, mask, 0.5, [3], chunk_tokens=1000)
    (g_one,) = torch.autograd.grad(one.sum(), hidden)
    three = logprobs_from_hidden(head, hidden, ids, mask, 0.5, [3], chunk_tokens=3)
    (g_three,) = torch.autograd.grad(three.sum(), hidden)
    torch.testing.assert_close(one, three)
    torch.testing.assert_close(g_one, g_three)
    assert (one[1, 2:] == 0).all() and (g_one[1, 2:] == 0).all()
    # a banned id that is nevertheless the target scores -inf: the mask really is applied
    ids[0, 0] = 3
    assert logprobs_from_hidden(head, hidden, ids, mask, 1.0, [3])[0, 0] == float("-inf")
