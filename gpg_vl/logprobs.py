"""Teacher-forced per-token log-probs of completions given their (image + text) prompts, without [N, L, V].

Trap: the hidden state at position t predicts token t+1, so the completion's log-probs come from the hidden
states of the last prompt token through the second-to-last completion token. The model is asked for hidden
states only (`logits_to_keep=1`); the LM head runs here, a chunk of completion tokens at a time, and each
chunk keeps just two floats per token (the chosen token's logit and the row's log-sum-exp; TRL calls this
"selective log-softmax"). The chunk's logits are recomputed in backward (activation checkpointing), so
neither the forward nor the backward ever holds vocabulary-sized rows for more than one chunk.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

# Completion tokens per LM-head chunk. The backward of one chunk holds about four [chunk, V] fp32 tensors
# (logits, softmax, their gradients): at Qwen's 151,936 tokens that is ~0.6 GB for 256 tokens, and it was
# 2.4 GB at 1024 (measured as the peak of a LoRA step, where no optimizer state hides it).
CHUNK_TOKENS = 256


def compute_token_logprobs(
    model,
    prompt_inputs,  # BatchFeature of N left-padded prompts: input_ids/attention_mask/mm_token_type_ids [N, P], pixel_values, image_grid_thw
    completion_ids: torch.Tensor,  # [N, L] right-padded
    response_mask: torch.Tensor,  # [N, L] 1.0 on completion tokens (through EOS)
    temperature: float = 1.0,
    suppressed_ids: list[int] | None = None,
) -> torch.Tensor:
    """log pi(completion token | prefix) for every completion position, [N, L] (0 where masked out).

    The per-row path: each row carries its own copy of its prompt. `gpg_vl.prefix` computes the same
    numbers with each prompt run once per group.
    """
    device = prompt_inputs["input_ids"].device
    completion_ids = completion_ids.to(device)
    response_mask = response_mask.to(device)
    L = completion_ids.shape[1]
    inputs = dict(prompt_inputs)
    inputs["input_ids"] = torch.cat([prompt_inputs["input_ids"], completion_ids], dim=1)  # [N, P+L]
    inputs["attention_mask"] = torch.cat([prompt_inputs["attention_mask"], response_mask.long()], dim=1)
    # The model requires mm_token_type_ids over the whole sequence; completions hold no image tokens.
    if "mm_token_type_ids" in prompt_inputs:
        inputs["mm_token_type_ids"] = torch.cat(
            [prompt_inputs["mm_token_type_ids"], torch.zeros_like(completion_ids)], dim=1
        )
    hidden = last_hidden_states(model, **inputs, use_cache=False)[:, -(L + 1) : -1]  # [N, L, H]: P-1+t predicts token t
    return logprobs_from_hidden(lm_head_of(model), hidden, completion_ids, response_mask, temperature, suppressed_ids)


def last_hidden_states(model, **inputs):
    """The final (normed) hidden states, [N, S, H], from a forward that builds logits for one position only.

    Called on the module the trainer holds (DDP-wrapped or not) so DDP's forward hooks still run.
    """
    out = model(**inputs, logits_to_keep=1, output_hidden_states=True)
    return out.hidden_states[-1]  # transformers ties the last entry to the post-norm `last_hidden_state`


def lm_head_of(model) -> torch.nn.Module:
    """The output projection of a (possibly DDP- or PEFT-wrapped) causal LM."""
    inner = getattr(model, "module", model)  # DDP
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"{type(inner).__name__} exposes no output embeddings (lm_head); cannot score tokens")
    return head


def logprobs_from_hidden(
    lm_head: torch.nn.Module,
    hidden: torch.Tensor,  # [N, L, H] hidden state that predicts each completion token
    completion_ids: torch.Tensor,  # [N, L]
    response_mask: torch.Tensor,  # [N, L]
    temperature: float = 1.0,
    suppressed_ids: list[int] | None = None,
    chunk_tokens: int = CHUNK_TOKENS,
) -> torch.Tensor:
    """Selective log-softmax: log-prob of each completion token, [N, L], 0 where `response_mask` is 0.

    Only masked-in tokens reach the LM head (padding costs nothing). Banned ids are set to -inf and the
    logits divided by the temperature, i.e. the distribution the rollout engine sampled from.
    """
    keep = response_mask.bool()
    h = hidden[keep]  # [T, H] the T real completion tokens
    targets = completion_ids[keep]  # [T]
    banned = None
    if suppressed_ids:
        banned = torch.zeros(output_rows(lm_head), dtype=torch.bool, device=h.device)
        banned[suppressed_ids] = True
    divide = temperature if temperature > 0 and temperature != 1.0 else None
    # Trap: ZeRO-3 does not gather a FROZEN partitioned weight (LoRA's LM head) when backward recomputes the
    # chunk, so such a head keeps each chunk's logits for backward instead (more memory, no recompute).
    weight = lm_head.weight
    recompute = weight.requires_grad or not hasattr(weight, "ds_shape")
    pieces = []
    for start in range(0, h.shape[0], chunk_tokens):
        args = (h[start : start + chunk_tokens], targets[start : start + chunk_tokens])
        if torch.is_grad_enabled() and h.requires_grad and recompute:
            # recompute this chunk's [chunk, V] logits in backward instead of keeping them for it
            pieces.append(checkpoint(_chunk_logprobs, lm_head, *args, banned, divide, use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(lm_head, *args, banned, divide))
    out = torch.zeros(completion_ids.shape, dtype=torch.float32, device=hidden.device)
    if pieces:
        out = out.masked_scatter(keep, torch.cat(pieces))
    return out


def output_rows(lm_head: torch.nn.Module) -> int:
    """The vocabulary size the LM head scores. Trap: under ZeRO-3 a partitioned weight's `.shape` is (0,)
    between forwards; DeepSpeed keeps the real one in `ds_shape`."""
    weight = lm_head.weight
    return (getattr(weight, "ds_shape", None) or weight.shape)[0]


def _chunk_logprobs(lm_head, h: torch.Tensor, targets: torch.Tensor, banned: torch.Tensor | None, temperature: float | None) -> torch.Tensor:
    logits = lm_head(h).float()  # [c, V]
    if banned is not None:
        logits = logits.masked_fill(banned, float("-inf"))
    if temperature is not None:
        logits = logits / temperature
    chosen = logits.gather(-1, targets[:, None]).squeeze(-1)  # [c]
    return chosen - torch.logsumexp(logits, dim=-1)
