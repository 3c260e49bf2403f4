"""Rollouts with Hugging Face `generate` on the policy itself (no copy, so weight sync is a no-op).

Traps handled here: batched generation needs LEFT padding; a sampling policy can emit `<|image_pad|>` and
break the next forward, so vision special tokens are suppressed; transformers samples with top_k=50
unless told otherwise; the log-prob of each sampled token is taken from the processed (temperature,
top-p) scores, i.e. the distribution it was actually drawn from.
"""

from __future__ import annotations

import torch

from gpg_vl.rollout.base import Rollout, SamplingParams

class HFEngine:
    """`RolloutEngine` over `model.generate`, `batch_size` sequences at a time."""

    def __init__(self, model, processor, batch_size: int = 64):
        self.model = model
        self.processor = processor
        self.batch_size = max(1, batch_size)
        self.suppress_ids = processor.suppressed_token_ids

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Nothing to do: this engine samples from the very module being trained."""
        self.model = model

    @torch.no_grad()
    def generate(self, prompts: list[list[dict]], params: SamplingParams) -> Rollout:
        # One row per completion, group-contiguous: prompt 0 repeated n times, then prompt 1, ...
        rows = [i for i in range(len(prompts)) for _ in range(params.n)]
        resized = [self.processor.resize(p) for p in prompts]
        if params.seed is not None:
            torch.manual_seed(params.seed)
        chunks = [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        parts = [self._generate_chunk([resized[i] for i in chunk], params) for chunk in chunks]
        pad_id = self.processor.pad_token_id
        rollout = Rollout.concat([Rollout([], *part) for part in parts], pad_id)
        rollout.prompt_indices = rows
        return rollout

    def _generate_chunk(self, batch: list[list[dict]], params: SamplingParams):
        model = self.model
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        inputs = self.processor(batch, padding_side="left").to(device)
        sampling = {} if params.greedy else dict(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        out = model.generate(
            **inputs,
            do_sample=not params.greedy,
            **sampling,
            max_new_tokens=params.max_new_tokens,
            suppress_tokens=self.suppress_ids,
            eos_token_id=self.processor.eos_token_ids,
            pad_token_id=self.processor.pad_token_id,
            use_cache=True,
            return_dict_in_generate=True,
            output_scores=True,
        )
        model.train(was_training)
        completion_ids = out.sequences[:, inputs["input_ids"].shape[1] :]  # [n, L]
        # log-prob of each sampled token under the processed scores it was sampled from, one step at a time
        # so a 150k vocabulary never materialises as [n, L, V]
        logprobs = torch.stack(
            [torch.log_softmax(s.float(), -1).gather(-1, completion_ids[:, t : t + 1]).squeeze(-1) for t, s in enumerate(out.scores)],
            dim=1,
        )  # [n, L]
        mask, finish = _response_mask(completion_ids, self.processor.eos_token_ids)
        logprobs = torch.where(mask.bool(), logprobs, torch.zeros_like(logprobs))
        texts = [self.processor.decode(ids[m.bool()]) for ids, m in zip(completion_ids, mask)]
        return completion_ids.cpu(), mask.cpu(), logprobs.cpu(), texts, finish


def _response_mask(completion_ids: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, list[str]]:
    """1.0 on tokens up to and including the first EOS ([n, L]); finish reason per row."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    # position of first EOS, or L when none: tokens at index <= that position are the response
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full_like(is_eos[:, 0], completion_ids.shape[1], dtype=torch.long))
    positions = torch.arange(completion_ids.shape[1], device=completion_ids.device)
    mask = (positions[None, :] <= first[:, None]).float()
    finish = ["stop" if hit else "length" for hit in is_eos.any(1).tolist()]
    return mask, finish
