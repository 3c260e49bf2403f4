"""Combinations that can only fail on a GPU are refused here, in one line, before training starts:
adamw_8bit under FSDP2 (bitsandbytes cannot step DTensor shards) and flash-attn with fp32 activations.
Plus the CPU-visible halves of the GPU-path fixes: the LM-head mask size under ZeRO-3 (`ds_shape`),
a frozen vision tower whose merger still trains, and DeepSpeed's {rank: shard} optimizer resume."""

import dataclasses

import pytest
import torch

from gpg_vl.cli import main
from gpg_vl.config import ConfigError, load_config
from test_trainer import args_for


def test_adamw_8bit_under_fsdp_is_a_one_line_error(tiny_model_dir, tmp_path, capsys):
    assert main(args_for(tiny_model_dir, tmp_path / "x", "train.sharding=fsdp", "optim.name=adamw_8bit")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "adamw_8bit" in err and "train.sharding=fsdp" in err


def test_flash_attention_with_fp32_weights_is_refused(tiny_model_dir):
    from gpg_vl.modeling import load_policy

    cfg = dataclasses.replace(load_config(None).model, name_or_path=str(tiny_model_dir), dtype="float32", attn_implementation="flash_attention_2")
    with pytest.raises(ConfigError, match="flash_attention_2 needs bf16/fp16") as e:
        load_policy(cfg, "cpu")
    assert "\n" not in str(e.value)


def test_banned_token_mask_uses_the_real_vocabulary_of_a_partitioned_head():
    """ZeRO-3 leaves a partitioned weight with shape (0,) and the real one in `ds_shape` (bug 2: IndexError)."""
    from gpg_vl.logprobs import logprobs_from_hidden

    head = torch.nn.Linear(4, 10, bias=False)
    hidden, ids, mask = torch.randn(1, 3, 4), torch.tensor([[1, 2, 3]]), torch.ones(1, 3)
    expected = logprobs_from_hidden(head, hidden, ids, mask, suppressed_ids=[7, 9])

    class Partitioned(torch.nn.Module):  # what DeepSpeed leaves between forwards: real shape only in ds_shape
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.empty(0))
            self.weight.ds_shape = head.weight.shape

        def forward(self, h):  # DeepSpeed gathers the weight inside forward
            return head(h)

    got = logprobs_from_hidden(Partitioned(), hidden, ids, mask, suppressed_ids=[7, 9])
    torch.testing.assert_close(got, expected)


def test_deepspeed_optimizer_shard_is_passed_by_rank_with_fp32_masters():
    """DeepSpeed's ZeRO `load_state_dict(state_dict_list, ..., load_from_fp32_weights)` indexes the list by
    data-parallel rank (bug 3: a bare shard gave KeyError 0) and, without the flag, rebuilds the fp32
    masters from the weights. Checked against the installed DeepSpeed's signatures."""
    import inspect

    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from gpg_vl.distributed import load_deepspeed_optimizer_shard

    for cls in (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3):
        params = inspect.signature(cls.load_state_dict).parameters
        assert list(params)[1] == "state_dict_list" and "load_from_fp32_weights" in params
    calls = []

    class Recorder:
        def load_state_dict(self, state_dict_list, **kwargs):
            calls.append((state_dict_list, kwargs))

    load_deepspeed_optimizer_shard(Recorder(), 1, {"x": 1})
    (shards, kwargs), = calls
    assert shards[1] == {"x": 1} and kwargs["load_from_fp32_weights"] is True


def test_lora_merge_holds_one_delta_at_a_time(tiny_model_dir, monkeypatch):
    """Bug 9: building every fp32 delta before merging any cost ~8 GB at 2B. Invariant: when a delta is
    built, every earlier one is already freed; and the merge still equals peft's own."""
    import copy
    import weakref

    import gpg_vl.lora as lora
    from gpg_vl.config import LoraConfig
    from gpg_vl.modeling import load_policy

    model_cfg = dataclasses.replace(load_config(None).model, name_or_path=str(tiny_model_dir), lora=LoraConfig(r=4, alpha=8))
    policy, _ = load_policy(model_cfg, "cpu")
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    live, original = [], lora._lora_delta

    def tracked(layer):
        assert all(ref() is None for ref in live), "an earlier LoRA delta is still alive"
        delta = original(layer)
        live.append(weakref.ref(delta))
        return delta

    monkeypatch.setattr(lora, "_lora_delta", tracked)
    merged = lora.merged_state_dict(policy)
    assert len(live) > 1
    reference = copy.deepcopy(policy).merge_and_unload().state_dict()
    for name, value in merged.items():
        torch.testing.assert_close(value, reference[name], msg=name)
