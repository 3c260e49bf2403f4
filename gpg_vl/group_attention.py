"""Decode attention that reads each group's prompt once.

The G completions of a prompt share its keys and values. The static decode loop used to copy them into
every row's cache, and attention then read all B x G copies at every token, padded out to the cache's full
length (at `small-20m` 32 rows x 256 slots, 600 us per layer per token). Here the prompt's keys and values
stay as the prefill left them, one row per prompt, and the completion's own keys and values go to a
pre-allocated cache of the completion's length. Per layer and token, a query of row (prompt b, completion g)
attends over

    [prompt b's keys (read once for the group's G x heads queries, one GEMM), row's completion keys so far]

with one softmax over the joined scores, so the result is the same attention over the same keys as the
full cache; only the order of the sums differs (log-probs agree to ~1e-6 at `small-20m`).

It is an attention implementation registered with transformers (`ATTENTION`): `group_decode` sets the
language model's `_attn_implementation` to it for the block. transformers then builds no mask for it (a
custom implementation gets none), and the prompt's padding is applied here from the prefill's 2-D mask.
Grouped-query heads are folded onto their key/value heads (query head h reads key/value head h // r, as
transformers' `repeat_kv` lays them out), so nothing is repeated.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from transformers import AttentionInterface

from gpg_vl.decode import float32_on_cpu

ATTENTION = "gpg_vl_group_decode"


@dataclass
class GroupPrompt:
    """The prompts' keys and values for one decode, and where the completion is."""

    keys: list[torch.Tensor]  # per layer [B, kv_heads, P, head_dim]
    values: list[torch.Tensor]
    bias: torch.Tensor  # [B, 1, 1, P]: 0 on the prompt's tokens, -inf on its left padding
    group_size: int  # G: rows b*G .. b*G+G-1 complete prompt b
    step: int = 0  # the token going in now is completion token `step`, written to completion slot `step`
    # for a compiled step, whose shapes cannot follow `step`: [1, 1, 1, slots], 0 on the completion slots
    # written so far and -inf on the rest, and attention reads every slot; None: it reads slots [0, step]
    written: torch.Tensor | None = None

    def open_slot(self, step: int) -> None:
        """Before the forward of completion token `step`: it is written to slot `step` and attends to it."""
        self.step = step
        if self.written is not None:
            self.written[..., step] = 0.0

    @classmethod
    def from_prefill(cls, cache, attention_mask: torch.Tensor, group_size: int, dtype: torch.dtype) -> GroupPrompt:
        """From the prefill's DynamicCache (B rows, not expanded to B x G) and its [B, P] padding mask."""
        bias = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
        bias = bias.masked_fill(attention_mask == 0, float("-inf"))[:, None, None, :]
        keys = [layer.keys for layer in cache.layers]
        values = [layer.values for layer in cache.layers]
        return cls(keys=keys, values=values, bias=bias, group_size=group_size)


_ACTIVE: dict[int, GroupPrompt] = {}  # id(text config) -> the decode in progress for that model


def group_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention signature. query [N, H, 1, D]; key/value: the completion cache returned by
    its `update`, [N, kv_heads, slots, D] with slots [0, step] written. Returns ([N, 1, H, D], None)."""
    prompt = _ACTIVE.get(id(module.config))
    if prompt is None:
        raise RuntimeError(f"{ATTENTION} attention runs only inside gpg_vl.group_attention.group_decode")
    if query.shape[2] != 1:
        raise ValueError(f"{ATTENTION} attention decodes one token per row; got a query of {query.shape[2]}")
    if kwargs.get("sliding_window") is not None:
        raise ValueError(f"{ATTENTION} attention has no sliding window (layer {module.layer_idx})")
    N, H, _, D = query.shape
    G, kv = prompt.group_size, key.shape[1]
    B, r = N // G, H // kv
    scale = D**-0.5 if scaling is None else scaling
    prompt_keys, prompt_values = prompt.keys[module.layer_idx], prompt.values[module.layer_idx]
    P = prompt_keys.shape[2]
    # the group's G x r queries of each key/value head against its prompt: [B, kv, G*r, P]
    grouped = query.reshape(B, G, kv, r, D).transpose(1, 2).reshape(B, kv, G * r, D)
    on_prompt = torch.matmul(grouped, prompt_keys.transpose(-1, -2)).mul_(scale).add_(prompt.bias)
    on_prompt = on_prompt.view(B, kv, G, r, P).transpose(1, 2).reshape(N, kv, r, P)
    # each row's queries against its own completion so far: [N, kv, r, step + 1] (or [N, kv, r, slots], masked)
    rows = query.reshape(N, kv, r, D)
    if prompt.written is None:
        own_keys, own_values = key[:, :, : prompt.step + 1], value[:, :, : prompt.step + 1]
        on_own = torch.matmul(rows, own_keys.transpose(-1, -2)).mul_(scale)
    else:  # every slot; the unwritten ones (zeros, or an earlier token's values) get no weight
        own_keys, own_values = key, value
        on_own = torch.matmul(rows, own_keys.transpose(-1, -2)).mul_(scale).add_(prompt.written)
    weights = torch.softmax(torch.cat([on_prompt, on_own], dim=-1), dim=-1)
    from_prompt = weights[..., :P].reshape(B, G, kv, r, P).transpose(1, 2).reshape(B, kv, G * r, P)
    out = torch.matmul(from_prompt, prompt_values).view(B, kv, G, r, D).transpose(1, 2).reshape(N, kv, r, D)
    out = out + torch.matmul(weights[..., P:], own_values)
    return out.reshape(N, 1, H, D), None


AttentionInterface.register(ATTENTION, group_attention)


def group_decode_applies(model) -> bool:
    """Where the decode loop uses this attention: float32 weights on the CPU (where it was measured and
    tested), a language model without sliding-window layers."""
    text = getattr(model, "module", model).config.get_text_config()
    sliding = getattr(text, "use_sliding_window", False) or any(
        kind != "full_attention" for kind in getattr(text, "layer_types", None) or ()
    )
    return float32_on_cpu(model) and not sliding


@contextlib.contextmanager
def group_decode(model, prompt: GroupPrompt):
    """Inside the block, the language model's attention is `group_attention` over `prompt`; call
    `prompt.open_slot(step)` before each decode forward. The model's own implementation comes back after, even on an
    error."""
    text = getattr(model, "module", model).config.get_text_config()
    before = text._attn_implementation_internal
    _ACTIVE[id(text)] = prompt
    text._attn_implementation_internal = ATTENTION  # the text config only: the vision tower ran in prefill
    try:
        yield prompt
    finally:
        text._attn_implementation_internal = before
        _ACTIVE.pop(id(text), None)
