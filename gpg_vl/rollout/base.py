"""What a rollout engine is: chat messages with PIL images in, G sampled completions per prompt out.

The trainer, `gpg-vl eval` and the demo talk to engines only through `RolloutEngine`, so an engine
(Hugging Face `generate`, vLLM) can be swapped without touching them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class SamplingParams:
    """How to sample. temperature == 0 means greedy decoding."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k (transformers would otherwise default to 50)
    max_new_tokens: int = 256
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def sampling_params(rollout_cfg, **changes) -> SamplingParams:
    """The one place SamplingParams is built from a `RolloutConfig`: n = group_size, its temperature, top_p,
    top_k and max_new_tokens, then `changes` on top (a seed; eval's n, greedy temperature or token limit)."""
    params = SamplingParams(n=rollout_cfg.group_size, temperature=rollout_cfg.temperature, top_p=rollout_cfg.top_p,
                            top_k=rollout_cfg.top_k, max_new_tokens=rollout_cfg.max_new_tokens)  # fmt: skip
    return dataclasses.replace(params, **changes)


@dataclass
class Rollout:
    """Completions of a batch of prompts, group-contiguous: prompt 0's n completions first, then prompt 1's.

    N = number of prompts * n; L = the longest completion in this batch.
    """

    prompt_indices: list[int]  # [N] index of the input prompt each completion answers
    completion_ids: torch.Tensor  # [N, L] long, right-padded with the pad id
    response_mask: torch.Tensor  # [N, L] float 1.0 on generated tokens up to and including EOS
    logprobs: torch.Tensor  # [N, L] float log-prob of each sampled token under the sampling distribution; 0 on padding
    texts: list[str]  # [N] decoded completions, special tokens removed
    finish_reasons: list[str]  # [N] "stop" (emitted EOS) or "length" (hit max_new_tokens)

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, indices: list[int]) -> "Rollout":
        """The completions at `indices`, in that order, with the padding trimmed to the longest kept."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        mask = self.response_mask[idx]
        width = int(mask.sum(1).max().item()) if len(indices) else 0
        return Rollout(
            prompt_indices=[self.prompt_indices[i] for i in indices],
            completion_ids=self.completion_ids[idx, :width],
            response_mask=mask[:, :width],
            logprobs=self.logprobs[idx, :width],
            texts=[self.texts[i] for i in indices],
            finish_reasons=[self.finish_reasons[i] for i in indices],
        )


    @staticmethod
    def concat(parts: list["Rollout"], pad_id: int, offsets: list[int] | None = None) -> "Rollout":
        """Stack rollouts (padding to the widest); `offsets` shift each part's prompt indices."""
        width = max(p.completion_ids.shape[1] for p in parts)
        offsets = offsets or [0] * len(parts)

        def pad(t: torch.Tensor, value) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

        return Rollout(
            prompt_indices=[i + off for p, off in zip(parts, offsets) for i in p.prompt_indices],
            completion_ids=torch.cat([pad(p.completion_ids, pad_id) for p in parts]),
            response_mask=torch.cat([pad(p.response_mask, 0.0) for p in parts]),
            logprobs=torch.cat([pad(p.logprobs, 0.0) for p in parts]),
            texts=[t for p in parts for t in p.texts],
            finish_reasons=[f for p in parts for f in p.finish_reasons],
        )


class PromptParityError(RuntimeError):
    """An engine built other prompt tokens than the HF processor does (the vLLM engine checks): the training
    forward would score a different prompt than the one sampled from, silently (TRL issues 6294, 6401)."""


class RolloutEngine(Protocol):
    """The interface the trainer, eval and demo use."""

    def generate(self, prompts: list[list[dict]], params: SamplingParams) -> Rollout:
        """Sample `params.n` completions for each prompt (a list of chat messages with PIL images)."""
        ...

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Called after every optimizer step so the engine samples from the updated policy."""
        ...
