"""Rollout engines, looked up by name (`rollout.engine` in the config): `hf` now, `vllm` on CUDA."""

from __future__ import annotations

from gpg_vl.rollout.base import Rollout, RolloutEngine, SamplingParams


def _make_hf(model, processor, rollout_cfg, model_cfg):
    from gpg_vl.rollout.hf import HFEngine

    return HFEngine(model, processor, rollout_cfg.batch_size)


def _make_vllm(model, processor, rollout_cfg, model_cfg):
    from gpg_vl.rollout.vllm import VLLMEngine  # the only module that imports vllm

    return VLLMEngine(
        model, processor, rollout_cfg, model_cfg,
        max_images_per_prompt=rollout_cfg.vllm_max_images_per_prompt,
        sleep=rollout_cfg.vllm_sleep,
        llm_kwargs=rollout_cfg.vllm_kwargs,
    )


ENGINES = {"hf": _make_hf, "vllm": _make_vllm}


def make_engine(name: str, model, processor, rollout_cfg, model_cfg) -> RolloutEngine:
    """Build the rollout engine `name` around the policy `model`."""
    if name not in ENGINES:
        raise KeyError(f"unknown rollout engine {name!r}; choose one of {', '.join(ENGINES)}")
    return ENGINES[name](model, processor, rollout_cfg, model_cfg)


__all__ = ["ENGINES", "Rollout", "RolloutEngine", "SamplingParams", "make_engine"]
