"""The shared-prefix training forward (each prompt and its images run once per group) against the per-row
forward it replaces: same log-probs and parameter gradients within 1e-5 relative, with left padding,
two images in one prompt, partial groups and completions of different lengths; Qwen2-VL, Qwen2.5-VL and Qwen3-VL."""

import pytest
import torch

from gpg_vl.config import ModelConfig
from gpg_vl.logprobs import compute_token_logprobs
from gpg_vl.modeling import load_policy
from gpg_vl.prefix import compute_token_logprobs_shared
from gpg_vl.registry import get_task
from gpg_vl.tiny import make_tiny


def prompts_and_completions(processor, G=3, L=6, seed=0):
    """3 prompts (one with two images, one with a differently sized image), G completions each of lengths 1..L."""
    task = get_task("shapes")
    prompts = [task.messages(e) for e in task.load("synthetic:4", "train")]
    first = prompts[0][0]["content"]
    first.insert(1, {"type": "image", "image": prompts[3][0]["content"][0]["image"].resize((84, 56))})
    prompts[1][0]["content"][0]["image"] = prompts[1][0]["content"][0]["image"].resize((60, 90))
    prompts = [processor.resize(p) for p in prompts[:3]]
    g = torch.Generator().manual_seed(seed)
    banned = set(processor.suppressed_token_ids)
    allowed = torch.tensor([i for i in range(len(processor.tokenizer)) if i not in banned])
    N = len(prompts) * G
    ids = allowed[torch.randint(len(allowed), (N, L), generator=g)]
    lengths = torch.randint(1, L + 1, (N,), generator=g)
    lengths[0] = L
    mask = (torch.arange(L)[None] < lengths[:, None]).float()
    ids = torch.where(mask.bool(), ids, processor.pad_token_id)
    return prompts, [i // G for i in range(N)], ids, mask


def grads_of(model, fn, weights):
    model.zero_grad(set_to_none=True)
    logprobs = fn()
    (logprobs * weights).sum().backward()
    return logprobs.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def policy(request, tmp_path_factory):
    folder = make_tiny(tmp_path_factory.mktemp(request.param) / "m", arch=request.param, seed=0)
    return load_policy(ModelConfig(name_or_path=str(folder), min_pixels=3136, max_pixels=12544))


@pytest.mark.parametrize("rows", ["all", "partial"])
def test_shared_prefix_equals_per_row_forward(policy, rows):
    model, processor = policy
    prompts, owner, ids, mask = prompts_and_completions(processor)
    keep = list(range(len(owner))) if rows == "all" else [0, 2, 3, 8]  # a micro-batch may cut groups
    owner, ids, mask = [owner[i] for i in keep], ids[keep], mask[keep]
    distinct = sorted(set(owner))
    index = torch.tensor([distinct.index(p) for p in owner])
    banned = processor.suppressed_token_ids
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(1))  # advantages of both signs
    per_row = processor([prompts[p] for p in owner])
    shared = processor([prompts[p] for p in distinct])
    ref, ref_grads = grads_of(model, lambda: compute_token_logprobs(model, per_row, ids, mask, 0.7, banned), weights)
    new, new_grads = grads_of(model, lambda: compute_token_logprobs_shared(model, shared, index, ids, mask, 0.7, banned), weights)
    assert (new[mask == 0] == 0).all() and (ref != 0).sum() == mask.sum()
    torch.testing.assert_close(new, ref, rtol=1e-5, atol=1e-5)
    assert new_grads.keys() == ref_grads.keys() and len(new_grads) == len(list(model.parameters()))
    for name in ref_grads:
        scale = ref_grads[name].abs().max()  # relative to the tensor's largest entry (float summation order)
        assert (new_grads[name] - ref_grads[name]).abs().max() <= 1e-5 * scale, name


def test_micro_batches_keep_the_count_and_sort_by_length():
    from gpg_vl.trainer import micro_batches

    lengths = [3, 9, 1, 9, 2, 5, 4, 8]  # rows 0..7; prompts: rows 0-3 -> 0, rows 4-7 -> 1
    owners = [0, 0, 0, 0, 1, 1, 1, 1]
    rows = [0, 1, 2, 4, 5, 6, 7]  # row 3 has advantage 0 and is not run
    by_length = micro_batches(rows, 3, 4, lengths)
    assert by_length == [[1, 7, 5], [6, 0, 4], [2], []]  # longest first: a chunk pays only for its longest row
    grouped = micro_batches(rows, 3, 3, lengths, owners)
    assert grouped == [[1, 0, 2], [7, 5, 6], [4]]  # prompt 0 (longest row 9) first, each group kept adjacent
    assert sorted(r for c in grouped for r in c) == rows and micro_batches(rows, 3, 3) == [[0, 1, 2], [4, 5, 6], [7]]


def test_trainer_step_is_the_same_with_and_without_the_shared_prefix(tiny_model_dir, tmp_path):
    from conftest import args_for, rows as metrics
    from gpg_vl.cli import main

    common = ("train.max_steps=1", "optim.micro_batch_size=5", "optim.max_grad_norm=0")
    assert main(args_for(tiny_model_dir, tmp_path / "shared", *common, "optim.shared_prefix=true")) == 0
    assert main(args_for(tiny_model_dir, tmp_path / "per_row", *common, "optim.shared_prefix=false")) == 0
    shared, per_row = metrics(tmp_path / "shared")[0], metrics(tmp_path / "per_row")[0]
    assert shared["skipped"] == 0 and shared["reward_mean"] == per_row["reward_mean"]  # the same rollouts
    assert shared["loss"] == pytest.approx(per_row["loss"], abs=1e-6)
    assert shared["grad_norm"] == pytest.approx(per_row["grad_norm"], rel=1e-5)


@pytest.mark.slow
def test_shared_prefix_equals_per_row_forward_on_small_20m(tmp_path):
    # wider and deeper (8 layers, vocabulary 2048): errors that cancel on the tiny model would show here
    folder = make_tiny(tmp_path / "small", preset="small-20m", seed=0)
    model, processor = load_policy(ModelConfig(name_or_path=str(folder), min_pixels=3136, max_pixels=12544))
    prompts, owner, ids, mask = prompts_and_completions(processor, G=2)
    distinct = sorted(set(owner))
    index = torch.tensor([distinct.index(p) for p in owner])
    banned = processor.suppressed_token_ids
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(1))
    per_row, shared = processor([prompts[p] for p in owner]), processor([prompts[p] for p in distinct])
    ref, ref_grads = grads_of(model, lambda: compute_token_logprobs(model, per_row, ids, mask, 1.0, banned), weights)
    new, new_grads = grads_of(model, lambda: compute_token_logprobs_shared(model, shared, index, ids, mask, 1.0, banned), weights)
    torch.testing.assert_close(new, ref, rtol=1e-5, atol=1e-5)
    for name in ref_grads:
        assert (new_grads[name] - ref_grads[name]).abs().max() <= 1e-5 * ref_grads[name].abs().max(), name
