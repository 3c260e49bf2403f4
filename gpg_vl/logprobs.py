"""Teacher-forced per-token log-probs of completions given their (image + text) prompts.

Trap: logits at position t predict token t+1, so the completion's log-probs come from the logits of the
last prompt token through the second-to-last completion token. Only those L positions are kept
(`logits_to_keep`), so the log-softmax never runs over the prompt.
"""

from __future__ import annotations

import torch


def compute_token_logprobs(
    model,
    prompt_inputs,  # BatchFeature of N left-padded prompts: input_ids/attention_mask/mm_token_type_ids [N, P], pixel_values, image_grid_thw
    completion_ids: torch.Tensor,  # [N, L] right-padded
    response_mask: torch.Tensor,  # [N, L] 1.0 on completion tokens (through EOS)
    temperature: float = 1.0,
    suppressed_ids: list[int] | None = None,
) -> torch.Tensor:
    """log pi(completion token | prefix) for every completion position, [N, L] (0 where masked out)."""
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
    logits = model(**inputs, use_cache=False, logits_to_keep=L + 1).logits  # [N, L+1, V]
    logits = logits[:, :-1].float()  # [N, L, V]: position P-1+t predicts completion token t
    if suppressed_ids:
        # the rollout engine bans these tokens, so the sampling policy renormalises without them
        logits[..., suppressed_ids] = float("-inf")
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature  # score the distribution the rollout sampled from
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)  # [N, L]
    return logprobs * response_mask
