"""A run's state beside its checkpoint: every rank's RNG state, the optimizer (whole, gathered under FSDP2, or
DeepSpeed's per-rank shards), the schedule and the prompt sampler, saved at a step and restored on resume.
The folder layout and atomic writes are gpg_vl/checkpoint.py's; this module decides what goes in.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from gpg_vl.checkpoint import CHECKPOINT_PREFIX, SHARDS_DIR, save_checkpoint, shards_staging_dir
from gpg_vl.config import Config
from gpg_vl.distributed import (
    drop_tied_copies, full_model_state_dict, full_optimizer_state_dict, is_deepspeed, is_fsdp2, load_deepspeed_optimizer_shard,
    load_full_optimizer_state_dict,
)
from gpg_vl.lora import adapter_state_dict, base_model, is_lora, merged_state_dict


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore(accelerator, model, optimizer, scheduler, sampler, state: dict, folder: Path) -> int:
    """Put a checkpoint's optimizer, schedule, sampler and this rank's RNG back; returns the step it was saved at."""
    load_optimizer_state(accelerator, model, optimizer, state, folder)
    scheduler.load_state_dict(state["scheduler"])
    sampler.load_state_dict(state["sampler"])
    rng = state["rng"]
    set_rng_state(rng[accelerator.process_index] if isinstance(rng, list) else rng)
    return state["step"]


def load_optimizer_state(accelerator, model, optimizer, state: dict, folder: Path) -> None:
    """The optimizer state a checkpoint saved, back onto this rank (the full state under FSDP2, this rank's
    own shard under DeepSpeed, the whole state otherwise)."""
    if is_fsdp2(model):
        load_full_optimizer_state_dict(model, optimizer.optimizer, state["optimizer"])
    elif is_deepspeed(accelerator):
        shard = torch.load(folder / SHARDS_DIR / f"rank{accelerator.process_index}.pt", map_location="cpu", weights_only=False, mmap=True)
        load_deepspeed_optimizer_shard(optimizer.optimizer, accelerator.process_index, shard)
    else:
        optimizer.load_state_dict(state["optimizer"])


def save(accelerator, model, processor, optimizer, scheduler, sampler, step: int, cfg: Config, metrics: dict | None = None) -> None:
    """Checkpoint with every rank's RNG state and this step's metrics line, written by the main process atomically."""
    rngs = accelerator.gather_for_metrics([rng_state()], use_gather_object=True) if accelerator.num_processes > 1 else [rng_state()]
    policy = accelerator.unwrap_model(model)
    # LoRA: merged weights, so the folder loads without peft. FSDP2: weights and optimizer state gathered
    # (collectives). DeepSpeed: a collective under ZeRO-3, and each rank stages its own optimizer shard.
    staged = None
    if is_fsdp2(model):
        weights = merged_state_dict(policy) if is_lora(policy) else full_model_state_dict(model)
        optimizer_state = full_optimizer_state_dict(model, optimizer.optimizer)
    else:
        weights = merged_state_dict(policy) if is_lora(policy) else drop_tied_copies(policy, accelerator.get_state_dict(model))
        optimizer_state = None if is_deepspeed(accelerator) else optimizer.state_dict()
    if is_deepspeed(accelerator):
        staged = shards_staging_dir(cfg.train.output_dir, step)
        staged.mkdir(parents=True, exist_ok=True)
        torch.save(optimizer.state_dict(), staged / f"rank{accelerator.process_index}.pt")
        accelerator.wait_for_everyone()
    adapter = adapter_state_dict(policy) if is_lora(policy) else None  # a gather under FSDP2: every rank
    if accelerator.is_main_process:
        state = {
            "step": step,
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "sampler": sampler.state_dict(),
            "rng": rngs,
            "config": cfg.to_dict(),
            "metrics": metrics,
        }
        if adapter is not None:
            state["adapter"] = adapter
        folder = Path(cfg.train.output_dir) / f"{CHECKPOINT_PREFIX}{step}"
        save_checkpoint(folder, base_model(policy), processor, state, cfg.checkpoint.keep_last, weights, staged)
    accelerator.wait_for_everyone()
