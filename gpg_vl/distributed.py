"""How the one training loop runs on several processes: DDP, DeepSpeed ZeRO (through accelerate) or FSDP2.

Whatever the backend, a GPG step is ONE optimizer step over the whole batch, however many micro-batches
it takes: the loss is normalised by whole-batch totals, gradients accumulate locally, and only the last
micro-batch synchronises them. Each backend is told so here, in one place:
- DDP: `no_sync` on every micro-batch but the last;
- DeepSpeed: micro-batch size and accumulation from our config, and the accumulation boundary declared per
  micro-batch (accelerate's `sync_gradients`), so the engine steps once per GPG step;
- FSDP2 (`train.sharding: fsdp`): parameters sharded with torch's `fully_shard`, which accelerate 1.15 only
  builds on multi-GPU, so the trainer applies it itself; this is the sharded path that runs on the CPU.
"""

from __future__ import annotations

import contextlib

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def configure_deepspeed(plugin, micro_batch_size: int, world_size: int, max_grad_norm: float) -> dict:
    """Fill the DeepSpeed config that accelerate built from its launcher config with our settings.

    With no DataLoader passed to `prepare`, DeepSpeed cannot resolve `auto` batch sizes; and its own
    accumulation must stay at 1, because the trainer declares the boundary of each GPG step itself.
    """
    ds = plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = micro_batch_size
    ds["gradient_accumulation_steps"] = 1
    ds["train_batch_size"] = micro_batch_size * world_size
    ds["gradient_clipping"] = float(max_grad_norm) if max_grad_norm > 0 else 0.0
    plugin.gradient_accumulation_steps = 1
    return ds


@contextlib.contextmanager
def micro_batch(accelerator: Accelerator, model, last: bool):
    """Backward of one micro-batch; gradients are synchronised (and DeepSpeed steps) only when `last`."""
    if is_deepspeed(accelerator):
        accelerator.gradient_state._set_sync_gradients(last)  # read by accelerator.backward for DeepSpeed
        try:
            yield
        finally:
            accelerator.gradient_state._set_sync_gradients(True)
    elif is_fsdp2(model):
        model.set_requires_gradient_sync(last)
        yield
    elif last:
        yield
    else:
        with accelerator.no_sync(model):
            yield


# ---- FSDP2 ----------------------------------------------------------------------------------------


def is_fsdp2(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model, device: torch.device):
    """Shard every transformer block (language model and ViT), then the rest, across all processes."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for module in model.modules():
        if type(module).__name__.endswith(("DecoderLayer", "VisionBlock")):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_model_state_dict(model) -> dict[str, torch.Tensor]:
    """Every parameter gathered on the CPU (a collective: call on all ranks; rank 0 gets the tensors).

    Tied parameters (the embedding and the LM head) come back as separate copies; only the first name is
    kept, as `save_pretrained` does for shared storage, so the folder matches an unsharded checkpoint."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    seen: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            state.pop(name, None)
        seen.setdefault(id(param), name)
    return state


def full_optimizer_state_dict(model, optimizer) -> dict:
    """The optimizer state of all shards, gathered for rank 0 (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state_dict(model, optimizer, state: dict) -> None:
    """Shard a full optimizer state (as saved by `full_optimizer_state_dict`) back onto this rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def grad_norm_value(norm) -> float:
    """A gradient norm as a float, whether a tensor, a DTensor (FSDP2) or already a number (DeepSpeed)."""
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm) if norm is not None else 0.0


def needs_lockstep(model) -> bool:
    """True when every rank must run every forward together: sharded weights (FSDP2, ZeRO-3) on >1 process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    from transformers.integrations.fsdp import is_fsdp_managed_module

    return is_fsdp2(model) or is_fsdp_managed_module(model) or is_deepspeed_zero3_enabled()


def any_rank(flag: bool, device: torch.device) -> bool:
    """`flag` OR-ed over all processes (a collective)."""
    import torch.distributed as dist

    t = torch.tensor(int(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t)
