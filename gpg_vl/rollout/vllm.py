"""Rollouts with vLLM, colocated on the trainer's GPU. The only module that imports vllm, and only lazily.

Coded against vLLM >=0.20,<0.34 (0.20 is the first release whose pins admit transformers 5; 0.33.0 is the
newest on the registry). Checked against the real source of 0.20.0 and 0.33.0 without importing it
(tests/test_vllm_api.py reads the wheels with `ast`): every `LLM` argument, `SamplingParams` field, prompt and
output field, method, sleep tag and weight-name prefix used here exists there. NOT yet run on a GPU: the
integration test in tests/test_rollout_vllm.py runs only where CUDA and vllm both import.

Traps handled: images are resized by the loaded processor's pixel budget and the prompt keeps ONE
unexpanded `<|image_pad|>` per image (HF-expanded ids can disagree with vLLM's own preprocessing, TRL issue
6401); log-probs are "processed" (after logit bias, temperature, top-k/top-p), as in the HF engine; sleep is
level 1 only, since level 2 drops buffers and a reload from disk overwrites synced weights (vLLM 29341,
TRL 5312); after every weight sync the prefix and image-encoder caches are reset, because both hold results
of the old weights.
"""

from __future__ import annotations

import os
import socket
import warnings
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch

from gpg_vl.lora import merged_parameters
from gpg_vl.images import message_images
from gpg_vl.rollout.base import Rollout, SamplingParams

VLLM_RANGE = ("0.20", "0.34")  # [lowest, first unsupported): keep equal to the `vllm` extra in pyproject.toml
INSTALL_HINT = "pip install 'gpg-vl[vllm]' on a CUDA machine"
IMAGE_PLACEHOLDER = "<|image_pad|>"
# vLLM's logit_bias is additive; -100 (the OpenAI range's floor) leaves a probability below e^-100, so the
# suppressed tokens are never drawn and the normaliser differs from the training forward's -inf mask by <1e-40.
SUPPRESS_BIAS = -100.0
# Name segments that wrappers add (torch.compile, activation checkpointing; DDP adds a leading "module").
WRAPPER_SEGMENTS = ("_orig_mod", "_checkpoint_wrapped_module")


# ---------------------------------------------------------------------------------------------------------
# Pure helpers: no vllm import, unit-tested on the CPU
# ---------------------------------------------------------------------------------------------------------


def build_requests(processor, prompts: list[list[dict]], max_images: int | None = None) -> list[dict]:
    """One vLLM prompt dict per conversation: chat text with one `<|image_pad|>` per image, and the resized images.

    vLLM expands each placeholder itself from the image it is given; the images are already at the size the
    training forward sees (`processor.resize`, the HF engine's rule), so vLLM's processor, given the same
    min/max pixels (`build_llm_kwargs`), keeps them.
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


def build_llm_kwargs(
    model_path: str, rollout_cfg, model_cfg, pixels: tuple[int, int], max_images: int, sleep: bool, overrides: dict | None = None
) -> dict:
    """Keyword arguments of `vllm.LLM` for an engine colocated with the trainer on one GPU.

    `pixels` is the loaded processor's (min_pixels, max_pixels): `model_cfg.min_pixels`/`max_pixels` are None
    whenever the budget comes from the model folder (the default), and vLLM must resize by the same numbers.
    """
    min_pixels, max_pixels = pixels
    return {
        "model": model_path,
        # model.dtype=auto trains in bfloat16 on CUDA (modeling.torch_dtype); vLLM's own "auto" reads the config
        "dtype": "bfloat16" if model_cfg.dtype == "auto" else model_cfg.dtype,
        "gpu_memory_utilization": rollout_cfg.vllm_gpu_memory_utilization,
        "max_num_seqs": rollout_cfg.batch_size,
        # In-process engine (vLLM then turns its V1 multiprocessing off), one per training rank: load_weights
        # reaches the very model that samples, with no copy between processes.
        "distributed_executor_backend": "external_launcher",
        "tensor_parallel_size": 1,
        # log-probs of the distribution actually sampled from (after logit bias, temperature, top-k/top-p)
        "logprobs_mode": "processed_logprobs",
        "limit_mm_per_prompt": {"image": max_images},
        "mm_processor_kwargs": {"min_pixels": min_pixels, "max_pixels": max_pixels},
        "enable_sleep_mode": sleep,
        "seed": 0,
        **(overrides or {}),
    }


@contextmanager
def launcher_env(local_rank: int):
    """torchrun's variables, which vLLM's external launcher reads, for the duration of one call.

    Under `accelerate launch` / torchrun they exist and torch.distributed is up, so nothing changes; a single
    process has none, so they are filled in (only the missing ones) and removed again afterwards.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    wanted = {"RANK": "0", "LOCAL_RANK": str(local_rank), "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
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

    `LLM.apply_model(fn)` runs `fn(worker.get_model())` in every worker; with the in-process engine that
    `distributed_executor_backend="external_launcher"` gives, that is a plain call in this process, so the
    generator of tensors is never pickled. `get_model()` unwraps vLLM's CUDA-graph wrappers, which the
    attribute path `llm_engine.model_executor.driver_worker.model_runner.model` (TRL's) does not.
    `reset_encoder_cache` is on the engine, not on `LLM`, in every release of the range (0.20.0 to 0.33.0).
    """
    llm.apply_model(lambda model: model.load_weights(weights))
    llm.reset_prefix_cache()  # KV blocks of prompts run through the old weights
    # The encoder cache keys image embeddings by image hash alone: without a reset, an image seen before the
    # sync would reuse the old vision tower's embedding.
    llm.llm_engine.reset_encoder_cache()
    llm.reset_mm_cache()  # preprocessed images; weight-independent, but it grows every step unless cleared


# ---------------------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------------------


class VLLMEngine:
    """`RolloutEngine` over a vLLM `LLM` on the trainer's GPU, fed the policy's weights after every step.

    `sleep=True` offloads vLLM's weights to CPU and frees its KV cache between rollouts (level 1), at the cost
    of a host copy per step; `llm_kwargs` override any `vllm.LLM` argument (e.g. max_model_len, enforce_eager).
    """

    def __init__(
        self, model, processor, rollout_cfg, model_cfg, *,
        max_images_per_prompt: int = 1, sleep: bool = False, llm_kwargs: dict | None = None,
    ):
        vllm = import_vllm()
        if not torch.cuda.is_available():
            raise RuntimeError(f"rollout.engine=vllm needs a CUDA GPU; use rollout.engine=hf on this machine ({INSTALL_HINT})")
        if not version_supported(vllm.__version__):
            lo, hi = VLLM_RANGE
            warnings.warn(f"vllm {vllm.__version__} is outside the range this engine is coded for ({lo} <= v < {hi})", stacklevel=2)
        from gpg_vl.builtin import resolve_model_path

        self.processor = processor
        self.max_images = max_images_per_prompt
        self.sleep = sleep
        self._sampling_params = vllm.SamplingParams
        path = resolve_model_path(model_cfg.name_or_path)
        pixels = (processor.min_pixels, processor.max_pixels)  # the budget the policy was loaded with
        kwargs = build_llm_kwargs(path, rollout_cfg, model_cfg, pixels, max_images_per_prompt, sleep, llm_kwargs)
        device = next(model.parameters()).device
        with launcher_env(device.index if device.index is not None else 0):
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
        requests = build_requests(self.processor, prompts, self.max_images)
        copies = params.n if params.greedy else 1  # greedy: n identical requests of one sample each
        requests = [r for r in requests for _ in range(copies)]
        base = build_sampling_kwargs(params, self.processor.suppressed_token_ids, self.processor.eos_token_ids)
        sampling = [self._sampling_params(**base, seed=seed) for seed in request_seeds(params, len(requests))]
        self._wake(["weights", "kv_cache"])
        outputs = self.llm.generate(requests, sampling_params=sampling, use_tqdm=False)
        self._go_to_sleep()
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
