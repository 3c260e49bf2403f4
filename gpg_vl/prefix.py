"""Run each prompt once per group: prefill it (vision tower included) and let its G completions read the
prompt's keys and values from a cache indexed per row.

Used by the HF rollout engine (sampling) and by the training forward (`compute_token_logprobs_shared`). In
training the cache keeps its autograd graph, so each completion's gradient flows back through the shared
prompt and the group's contributions sum there, exactly as G separate copies would. Traps: the M-RoPE
positions of completion tokens continue from the prompt's largest position + 1 (not from its padded
length: image tokens share positions), and are passed explicitly so the model never reuses the
`rope_deltas` it caches between calls; a model with gradient checkpointing turned on drops the cache, so
the trainer falls back to the per-row path there.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from gpg_vl.logprobs import lm_head_of, logprobs_from_hidden


@dataclass
class PromptPrefix:
    """The prefilled prompts of a batch, B distinct prompts."""

    cache: object  # transformers DynamicCache: per layer keys/values [B, kv_heads, P, head_dim]
    attention_mask: torch.Tensor  # [B, P] left padding is 0
    next_position: torch.Tensor  # [B] M-RoPE position of the first completion token
    last_hidden: torch.Tensor | None  # [B, H] final hidden state of the last prompt token (predicts completion token 0)
    last_logits: torch.Tensor | None  # [B, V] logits of the last prompt token (sampling only)

    def select(self, index: torch.Tensor, cache: bool = True) -> None:
        """Keep row `index[i]` as row i (in place): [B] -> [N]; gradients flow back to the prompt and sum there.
        cache=False leaves the cache at its B rows (a decode that reads each prompt once per group)."""
        if cache:
            map_cache(self.cache, lambda t: select_rows(t, index))
        self.attention_mask = self.attention_mask[index]
        self.next_position = self.next_position[index]
        if self.last_hidden is not None:
            self.last_hidden = select_rows(self.last_hidden, index)
        if self.last_logits is not None:
            self.last_logits = select_rows(self.last_logits, index)


class _SelectRows(torch.autograd.Function):
    """x[index] whose backward sums each source row's gradients in a fixed order.

    Plain indexing's backward (index_put_ with accumulate) adds duplicate indices in a run-dependent order on
    the CPU, which broke bit-exact resume; a group's G rows are exactly such duplicates.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.rows = x.shape[0]
        return x[index]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        out = grad.new_zeros((ctx.rows, *grad.shape[1:]))
        for row in index.unique().tolist():
            out[row] = grad[index == row].sum(0)
        return out, None


def select_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows `index` of `x` along dim 0, with a deterministic backward."""
    return _SelectRows.apply(x, index) if x.requires_grad else x[index]


def map_cache(cache, fn) -> None:
    """Replace every layer's keys and values by fn(them), in place (the DynamicCache layout moved in transformers 5)."""
    if hasattr(cache, "layers"):
        for layer in cache.layers:
            if getattr(layer, "keys", None) is not None:
                layer.keys, layer.values = fn(layer.keys), fn(layer.values)
    else:  # transformers 4.x
        cache.key_cache = [fn(k) for k in cache.key_cache]
        cache.value_cache = [fn(v) for v in cache.value_cache]


def inner_model(model):
    """The module that owns `get_rope_index` (Qwen2VLModel and kin) under DDP / PEFT / ForConditionalGeneration."""
    inner, seen = model, 0
    while not hasattr(inner, "get_rope_index"):
        for attr in ("module", "base_model", "model"):
            if hasattr(inner, attr) and getattr(inner, attr) is not inner:
                inner = getattr(inner, attr)
                break
        else:
            raise AttributeError(f"{type(model).__name__} has no get_rope_index: shared-prefix needs an M-RoPE VLM")
        seen += 1
        if seen > 8:
            raise AttributeError(f"{type(model).__name__}: no get_rope_index within 8 wrappers")
    return inner


def prompt_positions(model, prompt_inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE position ids of the prompts [3, B, P] and the next position after each prompt [B]."""
    keys = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
    extra = {k: prompt_inputs[k] for k in keys if k in prompt_inputs}
    mask = prompt_inputs["attention_mask"]
    positions, _ = inner_model(model).get_rope_index(
        prompt_inputs["input_ids"], mm_token_type_ids=prompt_inputs["mm_token_type_ids"], attention_mask=mask, **extra
    )
    # padding holds a placeholder position; the next one follows the largest REAL position of the row
    real = positions.amax(0).masked_fill(mask == 0, -1)  # [B, P]
    return positions, real.amax(-1) + 1


def cache_kwarg(model) -> str:
    """`cache` in transformers >= 5.2x, `past_key_values` before (the name moved)."""
    inner = getattr(model, "module", model)  # DDP
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # PEFT
    forward = inner.forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def output_cache(out):
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


def prefill(model, prompt_inputs, want_hidden: bool) -> PromptPrefix:
    """Run the B prompts (images included) once, keeping their cache; under grad the cache carries the graph.

    `model` is what the trainer holds (DDP-wrapped or not): this is the one forward per micro-batch that goes
    through DDP, which arms its gradient all-reduce for the backward.
    """
    positions, next_position = prompt_positions(model, prompt_inputs)
    out = model(
        **prompt_inputs, position_ids=positions, use_cache=True, logits_to_keep=1, output_hidden_states=want_hidden
    )
    cache = output_cache(out)
    if cache is None:
        raise RuntimeError("the model returned no KV cache (gradient checkpointing on?); use optim.shared_prefix=false")
    return PromptPrefix(
        cache=cache,
        attention_mask=prompt_inputs["attention_mask"],
        next_position=next_position,
        last_hidden=out.hidden_states[-1][:, -1] if want_hidden else None,  # left padding: the last column is real
        last_logits=None if want_hidden else out.logits[:, -1],
    )


def continue_forward(model, prefix: PromptPrefix, input_ids: torch.Tensor, attention_mask: torch.Tensor, step: int, want_hidden: bool):
    """Feed `input_ids` [N, T] after the prompt and `step` earlier tokens; `attention_mask` [N, P+step+T]."""
    N, T = input_ids.shape
    positions = (prefix.next_position[:, None] + step + torch.arange(T, device=input_ids.device))[None].expand(3, N, T)
    policy = getattr(model, "module", model)  # the inner module: DDP's forward already ran in `prefill`
    return policy(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1 if want_hidden else T,
        output_hidden_states=want_hidden,
        **{cache_kwarg(model): prefix.cache},
    )


def compute_token_logprobs_shared(
    model,
    prompt_inputs,  # BatchFeature of B DISTINCT left-padded prompts (input_ids/attention_mask/mm_token_type_ids [B, P], images)
    prompt_index: torch.Tensor,  # [N] long: which of the B prompts each completion answers
    completion_ids: torch.Tensor,  # [N, L] right-padded
    response_mask: torch.Tensor,  # [N, L]
    temperature: float = 1.0,
    suppressed_ids: list[int] | None = None,
) -> torch.Tensor:
    """`compute_token_logprobs` with each prompt (and its images) run once instead of once per completion, [N, L]."""
    device = prompt_inputs["input_ids"].device
    completion_ids, response_mask = completion_ids.to(device), response_mask.to(device)
    prefix = prefill(model, prompt_inputs, want_hidden=True)
    prefix.select(prompt_index.to(device))
    mask = torch.cat([prefix.attention_mask, response_mask.long()], dim=1)  # [N, P+L]
    out = continue_forward(model, prefix, completion_ids, mask, 0, want_hidden=True)
    # completion token 0 is predicted by the prompt's last position, token t by completion position t-1
    hidden = torch.cat([prefix.last_hidden[:, None], out.hidden_states[-1][:, :-1]], dim=1)  # [N, L, H]
    return logprobs_from_hidden(lm_head_of(model), hidden, completion_ids, response_mask, temperature, suppressed_ids)


def compute_micro_batch_logprobs(
    model, processor, prompts: list[list[dict]], prompt_indices: list[int], completion_ids, response_mask,
    temperature: float, shared: bool,
) -> torch.Tensor:
    """[m, L] log-probs of one training micro-batch whose row i answers `prompts[prompt_indices[i]]`.

    shared: each distinct prompt is encoded and run once; otherwise every row carries its own copy.
    """
    from gpg_vl.logprobs import compute_token_logprobs

    device = next(getattr(model, "module", model).parameters()).device
    banned = processor.suppressed_token_ids
    if not shared:
        inputs = processor([processor.resize(prompts[p]) for p in prompt_indices]).to(device)
        return compute_token_logprobs(model, inputs, completion_ids, response_mask, temperature, banned)
    distinct = sorted(set(prompt_indices))
    inputs = processor([processor.resize(prompts[p]) for p in distinct]).to(device)
    index = torch.tensor([distinct.index(p) for p in prompt_indices], device=device)
    return compute_token_logprobs_shared(model, inputs, index, completion_ids, response_mask, temperature, banned)
