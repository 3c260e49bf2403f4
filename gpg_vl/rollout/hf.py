"""Rollouts with Hugging Face models on the policy itself (no copy, so weight sync is a no-op).

Two paths with the same sampling distribution: by default each prompt (and its images) is prefilled ONCE
and its G completions are sampled from that cache (`gpg_vl.prefix`; row-indexed copies, or read once per
group, below); with
`share_prefix=False`, `model.generate` runs on G copies of every prompt (the reference). The shared path
decodes over a pre-allocated static KV cache (`decode="static"`, gpg_vl.decode; on the CPU in float32 the
cache holds the completions only and group attention reads each prompt once per group,
gpg_vl.group_attention), optionally with a compiled step (`"compiled"`), or over transformers' growing
DynamicCache (`"dynamic"`, the reference). All keep the log-prob of every sampled token under the
distribution it was drawn from, one float per token: GRPO's
ratio uses them as `old_logprobs`, off-policy or asynchronous work needs them, and the demo's rollout
inspector shows them. Nothing vocabulary-sized is kept across steps (no `output_scores`: at Qwen's 151,936
tokens those rows cost ~27 GB for 64 sequences x 700 tokens).
Traps: batched generation needs LEFT padding; a sampling policy can emit `<|image_pad|>` and break the next
forward, so vision special tokens are suppressed; transformers samples with top_k=50 (and a checkpoint's
generation_config may add more) unless told otherwise, so the processors are built here, explicitly.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import (
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from gpg_vl.decode import (
    DECODE_MODES, DecodeStep, cache_length, can_pack_linears, completion_cache, packed_linears, static_cache,
    static_expands_the_cache, static_mask,
)
from gpg_vl.group_attention import GroupPrompt, group_decode, group_decode_applies
from gpg_vl.prefix import continue_forward, prefill
from gpg_vl.distributed import any_rank, needs_lockstep
from gpg_vl.rollout.base import Rollout, SamplingParams


class HFEngine:
    """`RolloutEngine` over the policy's forward, about `batch_size` sequences at a time."""

    def __init__(self, model, processor, batch_size: int = 64, share_prefix: bool = True, decode: str = "static"):
        if decode not in DECODE_MODES:
            raise ValueError(f"unknown decode mode {decode!r}; choose one of {', '.join(DECODE_MODES)}")
        self.model = model
        self.processor = processor
        self.batch_size = max(1, batch_size)
        self.suppress_ids = processor.suppressed_token_ids
        self.share_prefix = share_prefix
        self.decode = decode  # the shared-prefix path's decode loop: dynamic | static | compiled (gpg_vl.decode)
        self._step: DecodeStep | None = None  # kept across rollouts: a compiled step reuses its graph
        self._cache = None  # the compiled step's StaticCache, refilled by the next rollout of the same shape

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Nothing to do: this engine samples from the very module being trained."""
        self.model = model

    @torch.no_grad()
    def generate(self, prompts: list[list[dict]], params: SamplingParams) -> Rollout:
        if params.max_new_tokens < 1 or params.n < 1:
            raise ValueError(f"SamplingParams needs n >= 1 and max_new_tokens >= 1; got n={params.n}, max_new_tokens={params.max_new_tokens}")
        # One row per completion, group-contiguous: prompt 0 repeated n times, then prompt 1, ...
        rows = [i for i in range(len(prompts)) for _ in range(params.n)]
        resized = [self.processor.resize(p) for p in prompts]
        if params.seed is not None:
            torch.manual_seed(params.seed)
        model = self.model
        was_training = model.training
        model.eval()
        try:
            if self.share_prefix:
                per_call = max(1, self.batch_size // params.n)  # whole groups, ~batch_size rows per call
                chunks = [list(range(i, min(i + per_call, len(prompts)))) for i in range(0, len(prompts), per_call)]
                parts = [self._sample_shared([resized[i] for i in chunk], params) for chunk in chunks]
            else:
                chunks = [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
                parts = [self._generate_chunk([resized[i] for i in chunk], params) for chunk in chunks]
        finally:
            model.train(was_training)
        rollout = Rollout.concat([Rollout([], *part) for part in parts], self.processor.pad_token_id)
        rollout.prompt_indices = rows
        return rollout

    def _processors(self, params: SamplingParams) -> LogitsProcessorList:
        """Ban the vision tokens, then temperature, top-k, top-p: the distribution a token is drawn from."""
        chain = LogitsProcessorList()
        if self.suppress_ids:
            chain.append(SuppressTokensLogitsProcessor(self.suppress_ids, device=self._device()))
        if not params.greedy:
            if params.temperature != 1.0:
                chain.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k:
                chain.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                chain.append(TopPLogitsWarper(params.top_p))
        return chain

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _sample_shared(self, batch: list[list[dict]], params: SamplingParams):
        """n completions for each of the B prompts: prefill B rows once, decode B*n rows from the shared cache."""
        n, model, eos, T = params.n, self.model, self.processor.eos_token_ids, params.max_new_tokens
        device = self._device()
        inputs = self.processor(batch, padding_side="left").to(device)
        prefix = prefill(model, inputs, want_hidden=False)
        lockstep = needs_lockstep(model)
        mode = self._decode_mode(lockstep)
        # the static loop reads each prompt's keys/values once per group (gpg_vl.group_attention) where it applies;
        # otherwise every row gets its own copy of them
        grouped = self._reads_prompt_once(lockstep)
        prompt = GroupPrompt.from_prefill(prefix.cache, prefix.attention_mask, n, prefix.last_logits.dtype) if grouped else None
        rows = torch.arange(len(batch), device=device).repeat_interleave(n)
        prefix.select(rows, cache=not grouped)  # [B] -> [B*n], group-contiguous
        processors = self._processors(params)
        N, P = prefix.attention_mask.shape
        ids = torch.empty(N, P + T, dtype=torch.long, device=device)  # the prompt, then the sampled tokens
        ids[:, :P] = inputs["input_ids"].repeat_interleave(n, dim=0)
        logprobs = torch.zeros(N, T, device=device)  # [N, L]
        eos_t = torch.tensor(eos, device=device)
        unfinished = torch.ones(N, dtype=torch.bool, device=device)
        logits = prefix.last_logits.float()  # [N, V]
        next_logits = self._dynamic_steps(prefix) if mode == "dynamic" else self._static_steps(prefix, T, mode, prompt)
        # the decode GEMMs multiply with weights packed once per rollout (gpg_vl.decode.packed_linears) when
        # static or compiled was asked for (also where static falls back to the dynamic cache); not with sharded
        # weights, which are gathered per call, nor in the reference (dynamic) loop
        packing = self.decode != "dynamic" and not lockstep and can_pack_linears(model)
        with (
            packed_linears(model, N) if packing else contextlib.nullcontext(),
            group_decode(model, prompt) if grouped else contextlib.nullcontext(),
        ):
            for step in range(T):
                processed = processors(ids[:, : P + step], logits)  # [N, V]; processors see the past as input_ids
                if params.greedy:
                    token = processed.argmax(-1)
                else:  # exactly as transformers' sampler draws
                    token = torch.multinomial(torch.softmax(processed, dim=-1), num_samples=1).squeeze(1)
                scores = torch.log_softmax(processed, dim=-1)
                token = torch.where(unfinished, token, self.processor.pad_token_id)  # finished rows emit padding
                ids[:, P + step] = token
                logprobs[:, step] = scores.gather(-1, token[:, None]).squeeze(-1)
                unfinished &= ~torch.isin(token, eos_t)
                # sharded weights: a rank that is done keeps stepping (padding) until every rank is done
                running = any_rank(bool(unfinished.any()), device) if lockstep else bool(unfinished.any())
                if not running or step == T - 1:
                    break
                logits = next_logits(token, step)
        L = step + 1
        return self._finish(ids[:, P : P + L], logprobs[:, :L])

    def _decode_mode(self, lockstep: bool) -> str:
        # compiling through sharded-weight hooks (FSDP2, ZeRO-3) is untested: those ranks decode uncompiled
        mode = "static" if lockstep and self.decode == "compiled" else self.decode
        if mode == "static" and not self._reads_prompt_once(lockstep) and static_expands_the_cache(self.model):
            warnings.warn(  # Python's default filter shows it once, however many rollouts call this
                "rollout.decode=static: this transformers' sdpa attention copies the whole static KV cache at "
                "every step for grouped-query attention (no pack_gqa before transformers 5.23), which is slower "
                "than the dynamic loop; decoding with rollout.decode=dynamic (same tokens). Upgrade transformers "
                "for the static loop.", stacklevel=2,
            )
            return "dynamic"
        return mode

    def _reads_prompt_once(self, lockstep: bool) -> bool:
        """Whether the static or compiled loop attends with `group_attention` (the prompt's keys/values read once
        per group, the completion's in their own cache): on the CPU in float32, not with sharded weights
        (untested there)."""
        return self.decode != "dynamic" and not lockstep and group_decode_applies(self.model)

    def _dynamic_steps(self, prefix):
        """The reference decode: a DynamicCache and a mask that grow by one column per token."""
        mask = prefix.attention_mask

        def next_logits(token: torch.Tensor, step: int) -> torch.Tensor:
            nonlocal mask
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # [N, P+step+1]
            return continue_forward(self.model, prefix, token[:, None], mask, step, want_hidden=False).logits[:, -1].float()

        return next_logits

    def _static_steps(self, prefix, max_new_tokens: int, mode: str, prompt: GroupPrompt | None = None):
        """Decode over a pre-allocated cache (`mode` static or compiled): per token, one step call and no
        allocation of the model's state. With `prompt` (group attention) the cache holds the completion only,
        and attention takes the prompt's keys/values and padding from `prompt`."""
        N, P = prefix.attention_mask.shape
        if prompt is not None:
            slots = cache_length(0, max_new_tokens)
            cache, mask = completion_cache(self.model, prompt.keys, prompt.values, N, slots), None
            if mode == "compiled":  # one shape for every step: attention reads all slots, the unwritten masked
                prompt.written = prompt.bias.new_full((1, 1, 1, slots), float("-inf"))
        else:
            slots = cache_length(P, max_new_tokens)
            # a compiled step keeps its cache between rollouts of one shape (CUDA graphs replay on fixed addresses)
            cache = static_cache(self.model, prefix, slots, reuse=self._cache if mode == "compiled" else None)
            mask = static_mask(prefix, slots)
        self._cache = cache if mode == "compiled" and prompt is None else None
        prefix.cache = None  # the dynamic copy is no longer read
        steps = torch.arange(max_new_tokens, device=prefix.next_position.device)
        positions = (prefix.next_position[None, :] + steps[:, None])[:, None, :, None].expand(-1, 3, N, 1)  # [T, 3, N, 1]
        if self._step is None or self._step.policy is not getattr(self.model, "module", self.model) or self._step.compiled != (mode == "compiled"):
            self._step = DecodeStep(self.model, compile=mode == "compiled")
        step_fn = self._step

        def next_logits(token: torch.Tensor, step: int) -> torch.Tensor:
            if prompt is not None:
                prompt.open_slot(step)  # the completion slot this token is written to
            else:
                mask[:, P + step] = 1  # the slot this token is written to
            return step_fn(token[:, None], positions[step], mask, cache).float()

        return next_logits

    def _generate_chunk(self, batch: list[list[dict]], params: SamplingParams):
        """The reference path: `model.generate` over one row per completion (each prompt copied n times)."""
        device = self._device()
        inputs = self.processor(batch, padding_side="left").to(device)
        recorder = SampledLogprobs()
        out = self.model.generate(
            **inputs,
            do_sample=not params.greedy,
            # neutral settings so generate adds no processor of its own (a checkpoint's generation_config may
            # carry top_k, top_p, temperature or a repetition penalty); ours run in `logits_processor`
            **({} if params.greedy else dict(temperature=1.0, top_k=0, top_p=1.0)),
            repetition_penalty=1.0,
            logits_processor=LogitsProcessorList([*self._processors(params), recorder]),
            max_new_tokens=params.max_new_tokens,
            eos_token_id=self.processor.eos_token_ids,
            pad_token_id=self.processor.pad_token_id,
            use_cache=True,
            return_dict_in_generate=True,
        )
        completion_ids = out.sequences[:, inputs["input_ids"].shape[1] :]  # [n, L]
        return self._finish(completion_ids, recorder.logprobs(completion_ids))

    def _finish(self, completion_ids: torch.Tensor, logprobs: torch.Tensor):
        mask, finish = _response_mask(completion_ids, self.processor.eos_token_ids)
        logprobs = torch.where(mask.bool(), logprobs, torch.zeros_like(logprobs))
        texts = [self.processor.decode(ids[m.bool()]) for ids, m in zip(completion_ids, mask)]
        return completion_ids.cpu(), mask.cpu(), logprobs.cpu(), texts, finish


class SampledLogprobs(LogitsProcessor):
    """Placed last in `generate`'s processors: records log p(sampled token), one float per row per step.

    The token of step t is drawn AFTER the processors run, so call t+1 (whose `input_ids` end with it) looks
    it up in step t's normalised scores, the only [rows, V] tensor kept; the last step's token is looked up
    in `logprobs()`. Scores pass through unchanged.
    """

    def __init__(self):
        self.previous: torch.Tensor | None = None  # [rows, V] log-softmax of the last step's processed scores
        self.taken: list[torch.Tensor] = []  # per finished step: [rows]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.previous is not None:
            self.taken.append(self.previous.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def logprobs(self, completion_ids: torch.Tensor) -> torch.Tensor:
        """[rows, L] for the generated `completion_ids` [rows, L]."""
        L = completion_ids.shape[1]
        taken = self.taken[:L]  # generate may run (and undo) a step past the end
        if len(taken) < L:
            taken.append(self.previous.gather(-1, completion_ids[:, L - 1 : L]).squeeze(-1))
        self.previous = None
        if len(taken) != L:
            raise RuntimeError(f"recorded {len(taken)} sampling steps for {L} generated tokens")
        return torch.stack(taken, dim=1) if taken else completion_ids.new_zeros(completion_ids.shape, dtype=torch.float)


def _response_mask(completion_ids: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, list[str]]:
    """1.0 on tokens up to and including the first EOS ([n, L]); finish reason per row."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    # position of first EOS, or L when none: tokens at index <= that position are the response
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full_like(is_eos[:, 0], completion_ids.shape[1], dtype=torch.long))
    positions = torch.arange(completion_ids.shape[1], device=completion_ids.device)
    mask = (positions[None, :] <= first[:, None]).float()
    finish = ["stop" if hit else "length" for hit in is_eos.any(1).tolist()]
    return mask, finish
