"""How the one training loop runs on several processes: DDP, DeepSpeed ZeRO (through accelerate) or FSDP2.

Whatever the backend, a GPG step is ONE optimizer step over the whole batch, however many micro-batches
it takes: the loss is normalised by whole-batch totals, gradients accumulate locally, and only the last
micro-batch synchronises them. Each backend is told so here, in one place:
- DDP: `no_sync` on every micro-batch but the last;
- DeepSpeed: micro-batch size and accumulation from our config, and the accumulation boundary declared per
  micro-batch (accelerate's `sync_gradients`), so the engine steps once per GPG step;
- FSDP2 (`train.sharding: fsdp`): parameters sharded with torch's `fully_shard`, which accelerate 1.16 only
  builds on multi-GPU, so the trainer applies it itself.
DeepSpeed and FSDP2 both run on the CPU too (gloo), which is how `make test` checks them.
A load that fails on one rank fails on all of them together (`fail_together`), never leaving the others in a
collective.
"""

from __future__ import annotations

import contextlib
import os
import pickle

import torch
import torch.distributed.nn  # noqa: F401 (imported before any process group exists: see below)
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs

# Why `torch.distributed.nn` is imported here, ahead of every process group: its functional module binds
# `group.WORLD` as a default argument when first imported, and transformers' model modules import it (through
# torch's FSDP). Imported after the group is initialised, those defaults hold the gloo group past
# `destroy_process_group`, its worker threads outlive the interpreter, and a rank that finished can die with
# SIGABRT at exit (gpg_vl.cli.end_process_group). Imported before, the defaults are None: the default group.


@contextlib.contextmanager
def fail_together():
    """Run the block on every rank, then agree over all ranks on how it went: when it raised on any rank,
    every rank raises the same error, the first failing rank's class with its message after `rank R of W: `.

    For the phases where one rank may fail alone between collectives (a model folder missing on one machine,
    a data file it cannot read): without it the others would wait in their next collective for the process
    group's timeout (30 minutes). The agreement is itself a collective, so the block must hold none (a rank
    that raised part-way would skip them), and it waits for the slowest rank to end the block. The failing
    rank raises the new error `from` its own, so an unexpected one keeps its traceback there."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        yield
        return
    failure = None
    try:
        yield
    except Exception as e:  # KeyboardInterrupt and SystemExit pass: the launcher signals every rank
        failure = e
    reports: list = [None] * dist.get_world_size()
    dist.all_gather_object(reports, None if failure is None else _report(failure))
    for rank, report in enumerate(reports):
        if report is not None:
            raise _rebuild(report, f"rank {rank} of {len(reports)}: ") from failure


def _report(error: Exception) -> tuple[bytes | None, str, str]:
    """(the pickled class or None, its name, the message): plain bytes and strings, so the collective itself
    never fails to unpickle a class another rank cannot import (a task plugin loaded from a file)."""
    try:
        kind = pickle.dumps(type(error))
    except Exception:
        kind = None
    return kind, type(error).__name__, str(error)


def _rebuild(report: tuple[bytes | None, str, str], prefix: str) -> Exception:
    """The reported error as the same class with the prefixed message, or a RuntimeError naming the class
    when the class cannot be rebuilt here (the CLI then prints a traceback, as for any unexpected error)."""
    kind, name, message = report
    try:
        return pickle.loads(kind)(prefix + message)
    except Exception:
        return RuntimeError(f"{prefix}{name}: {message}")


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def launched_with_deepspeed() -> bool:
    """True under `accelerate launch` with a DeepSpeed config (accelerate's own flag for it)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and int(os.environ.get("LOCAL_RANK", -1)) != -1


def make_accelerator(use_cuda: bool, mixed_precision: str) -> Accelerator:
    """The Accelerator for this launch. Trap: `Accelerator(cpu=True)` silently turns a DeepSpeed launch into
    plain DDP (accelerate takes DeepSpeed only when `cpu` is false), so a DeepSpeed launch without CUDA gets
    `cpu=False` with gloo, and DeepSpeed runs ZeRO on its CPU accelerator (no oneCCL or IPEX needed)."""
    if not launched_with_deepspeed():
        return Accelerator(cpu=not use_cuda, mixed_precision=mixed_precision)
    try:
        import deepspeed.ops
    except ImportError:
        raise RuntimeError("this is a DeepSpeed launch but deepspeed is not installed: pip install 'gpg-vl[deepspeed]'") from None
    if use_cuda:
        return Accelerator(mixed_precision=mixed_precision)
    # DeepSpeed's CPU communicator JIT-builds its shared-memory op with g++ at init (~2 min on 2 cores) for
    # inference all-reduce only; training does not use it, so it is declared unavailable before init.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return Accelerator(cpu=False, mixed_precision=mixed_precision, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])


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


def prepare_reference(accelerator: Accelerator, ref_model):
    """GRPO's frozen reference model handed to DeepSpeed (no optimizer), as the policy is.

    Under ZeRO-3 transformers loads it partitioned (`zero.Init`), so without an engine its forward would run
    on empty parameters; under ZeRO-2 it stays whole (stage 0). Either way the engine casts it to the
    policy's precision (bf16), since DeepSpeed runs without autocast."""
    import copy

    import deepspeed

    ds = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    if ds["zero_optimization"]["stage"] != 3:
        ds["zero_optimization"]["stage"] = 0
    ds.pop("optimizer", None)
    ds.pop("scheduler", None)
    engine, *_ = deepspeed.initialize(model=ref_model, config=ds)
    engine.eval()  # DeepSpeedEngine.eval returns None, not the engine
    return engine


def load_deepspeed_optimizer_shard(zero_optimizer, rank: int, shard: dict) -> None:
    """This rank's saved ZeRO optimizer shard back into DeepSpeed's optimizer.

    Traps: DeepSpeed indexes the shards by data-parallel rank (a bare shard gives `KeyError: 0`), and
    without `load_from_fp32_weights` ZeRO-1/2 rebuild the fp32 master partition from the (bf16) weights
    instead of restoring the saved one, so a bf16 run would not resume exactly."""
    zero_optimizer.load_state_dict({rank: shard}, load_optimizer_states=True, load_from_fp32_weights=True)


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
    return drop_tied_copies(model, state)


def drop_tied_copies(model, state: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """`state` without the second name of each tied parameter (the LM head tied to the embedding).

    Gathers (FSDP2, DeepSpeed's `get_state_dict`) return tied parameters as separate copies, which
    `save_pretrained` would write twice; an unsharded save writes the first name only. ZeRO-3 gathers on the
    main process only; the others get None, passed through."""
    if state is None:
        return state
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            state.pop(name, None)
        seen.add(id(param))
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

    if is_deepspeed_zero3_enabled():
        return True
    return model is not None and (is_fsdp2(model) or is_fsdp_managed_module(model))


def any_rank(flag: bool, device: torch.device) -> bool:
    """`flag` OR-ed over all processes (a collective)."""
    import torch.distributed as dist

    t = torch.tensor(int(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t)


def all_reduce_sum(accelerator, values: list):
    """The element-wise sum of `values` over every rank (the values themselves on one process)."""
    if accelerator.num_processes == 1:
        return values
    return accelerator.reduce(torch.tensor(values, device=accelerator.device), "sum").tolist()


def all_reduce_max(accelerator, value: float) -> float:
    """The largest `value` over every rank."""
    if accelerator.num_processes == 1:
        return value
    t = torch.tensor(value, device=accelerator.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.item()
