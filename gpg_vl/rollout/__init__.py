"""Rollout engines, looked up by name (`rollout.engine` in the config): `hf`, and `vllm` (CUDA, or vLLM's CPU build)."""

from __future__ import annotations

from gpg_vl.errors import ConfigError
from gpg_vl.rollout.base import Rollout, RolloutEngine, SamplingParams, sampling_params


def _make_hf(model, processor, rollout_cfg, model_cfg, max_new_tokens=None):
    from gpg_vl.rollout.hf import HFEngine

    return HFEngine(model, processor, rollout_cfg.batch_size, decode=rollout_cfg.decode)


def _make_vllm(model, processor, rollout_cfg, model_cfg, max_new_tokens=None):
    from gpg_vl.rollout.vllm import VLLMEngine  # the only module that imports vllm

    return VLLMEngine(
        model, processor, rollout_cfg, model_cfg,
        max_images_per_prompt=rollout_cfg.vllm_max_images_per_prompt,
        sleep=rollout_cfg.vllm_sleep,
        llm_kwargs=rollout_cfg.vllm_kwargs,
        max_new_tokens=max_new_tokens,
        parity_every=rollout_cfg.vllm_parity_every,
    )


ENGINES = {"hf": _make_hf, "vllm": _make_vllm}


def make_engine(name: str, model, processor, rollout_cfg, model_cfg, max_new_tokens: int | None = None) -> RolloutEngine:
    """Build the rollout engine `name` around the policy `model`; `max_new_tokens` is the longest completion
    any caller will ask for, when it exceeds `rollout_cfg.max_new_tokens` (held-out evaluation)."""
    if name not in ENGINES:
        raise KeyError(f"unknown rollout engine {name!r}; choose one of {', '.join(ENGINES)}")
    return ENGINES[name](model, processor, rollout_cfg, model_cfg, max_new_tokens)


def check_engine(rollout_cfg, use_cuda: bool) -> None:
    """Fail before anything loads when the rollout engine's options cannot run here."""
    if rollout_cfg.engine == "vllm" and rollout_cfg.vllm_sleep and not use_cuda:
        raise ConfigError("rollout.vllm_sleep=true needs CUDA: vLLM's CPU build has no sleep mode; set rollout.vllm_sleep=false")


__all__ = ["ENGINES", "check_engine", "Rollout", "RolloutEngine", "SamplingParams", "make_engine", "sampling_params"]
