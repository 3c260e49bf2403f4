"""LoRA adapters on the language model (peft), and the plain-weights view every consumer sees.

Only the adapters train; the vision tower and every base weight stay frozen. Checkpoints hold MERGED weights
(W + scale * B @ A) as an ordinary Hugging Face folder, so `gpg-vl eval`, the demo and vLLM load them with no
peft at all; the adapter weights go into `trainer_state.pt` (key `adapter`), so a resumed run re-reads the
frozen base from the original `model.name_or_path` and continues from the exact adapter weights.
"""

from __future__ import annotations

import contextlib
import re

import torch


def add_lora(model, lora_cfg):
    """`model` wrapped with fresh LoRA adapters on the language model's `lora_cfg.target_modules`."""
    from peft import LoraConfig, get_peft_model

    names = "|".join(re.escape(m) for m in lora_cfg.target_modules)
    config = LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        # a regex is matched against full module names: only the language model, never the vision tower
        # (Qwen2.5-VL's ViT has gate/up/down projections of the same names)
        target_modules=rf".*language_model.*\.({names})",
    )
    return get_peft_model(model, config)


def is_lora(model) -> bool:
    return hasattr(model, "peft_config")


def base_model(model):
    """The Hugging Face model inside a PeftModel (or `model` itself)."""
    return model.get_base_model() if is_lora(model) else model


@torch.no_grad()
def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """Hugging Face-named weights with every adapter folded in, as CPU copies; `model` is left untouched."""
    if not is_lora(model):
        return model.state_dict()
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in _merged_entries(model, buffers=True)}


@torch.no_grad()
def merged_parameters(model):
    """(HF name, tensor) for each parameter once, adapters folded in: what a rollout engine loads (vLLM).

    Always full plain tensors: FSDP2's DTensor shards are gathered (a collective: every rank must iterate),
    and ZeRO-3 partitions are gathered one module at a time."""
    if not is_lora(model) and not any(hasattr(p, "full_tensor") or hasattr(p, "ds_shape") for p in model.parameters()):
        yield from model.named_parameters()
        return
    yield from _merged_entries(model, buffers=False)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # FSDP2 DTensor -> whole tensor


@contextlib.contextmanager
def _gathered(*modules):
    """ZeRO-3: the modules' own partitioned parameters whole for the block (a no-op otherwise)."""
    params = [p for m in modules for p in m.parameters(recurse=False) if hasattr(p, "ds_shape")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params):
        yield


def _merged_entries(model, buffers: bool):
    """(HF name, full tensor) module by module, each LoRA delta built only when its weight is reached.

    Bug fixed here: building every fp32 delta before merging any held about 8 GB extra at 2B (39 GB at 7B)
    at every save and vLLM sync; now one delta lives at a time. Tied parameters come once (first name).
    Under ZeRO-3 a yielded tensor is valid only until the next one is requested (its module is released)."""
    hf = base_model(model)
    modules = dict(hf.named_modules())
    seen: set[int] = set()
    for name, module in modules.items():
        if ".lora_" in name or name.endswith((".lora_A", ".lora_B")):
            continue
        parent = modules.get(name[: -len(".base_layer")]) if name.endswith(".base_layer") else None
        owner = name[: -len(".base_layer")] if parent is not None else name
        lora_parts = [parent.lora_A[a] for a in parent.active_adapters] + [parent.lora_B[a] for a in parent.active_adapters] if parent is not None else []
        with _gathered(module, *lora_parts):
            for leaf, param in module.named_parameters(recurse=False):
                if id(param) in seen or ".lora_" in f"{name}.{leaf}":
                    continue
                seen.add(id(param))
                value = _full(param.detach())
                if parent is not None and leaf == "weight":
                    value = value + _lora_delta(parent).to(value.dtype)
                yield (f"{owner}.{leaf}" if owner else leaf), value
            if buffers:
                for leaf, buf in module.named_buffers(recurse=False):
                    if buf is not None and leaf not in module._non_persistent_buffers_set:
                        yield (f"{owner}.{leaf}" if owner else leaf), buf


def _lora_delta(layer) -> torch.Tensor:
    """scale * B @ A summed over the active adapters of one peft `Linear`, from whole tensors."""
    delta = None
    for a in layer.active_adapters:
        d = _full(layer.lora_B[a].weight).float() @ _full(layer.lora_A[a].weight).float() * layer.scaling[a]
        delta = d if delta is None else delta + d
    return delta.T if getattr(layer, "fan_in_fan_out", False) else delta


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """The adapter weights alone (what a LoRA resume needs besides the unchanged base)."""
    from peft import get_peft_model_state_dict

    # whole tensors under FSDP2 (a collective: every rank calls this), not this rank's shard
    return {k: _full(v.detach()).cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state_dict(model, state: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise RuntimeError(f"saved LoRA adapter does not fit this model; unexpected keys: {unexpected[:3]}")
