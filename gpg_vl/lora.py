"""LoRA adapters on the language model (peft), and the plain-weights view every consumer sees.

Only the adapters train; the vision tower and every base weight stay frozen. Checkpoints hold MERGED weights
(W + scale * B @ A) as an ordinary Hugging Face folder, so `gpg-vl eval`, the demo and vLLM load them with no
peft at all; the adapter weights go into `trainer_state.pt` (key `adapter`), so a resumed run re-reads the
frozen base from the original `model.name_or_path` and continues from the exact adapter weights.
"""

from __future__ import annotations

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
    """Hugging Face-named weights with every adapter folded in; `model` itself is left untouched."""
    if not is_lora(model):
        return model.state_dict()
    from peft.tuners.lora import LoraLayer

    hf = base_model(model)
    deltas = {}
    for name, module in hf.named_modules():
        if isinstance(module, LoraLayer):
            deltas[name] = sum(module.get_delta_weight(a) for a in module.active_adapters)
    merged = {}
    for key, value in hf.state_dict().items():
        if ".lora_" in key:
            continue
        owner, _, leaf = key.rpartition(".")
        if owner.endswith(".base_layer"):
            module_name = owner[: -len(".base_layer")]
            key = f"{module_name}.{leaf}"
            if leaf == "weight":
                value = value + deltas[module_name].to(value.dtype)
        merged[key] = value
    return merged


@torch.no_grad()
def merged_parameters(model):
    """(HF name, tensor) for each parameter once, adapters folded in: what a rollout engine loads (vLLM)."""
    if not is_lora(model):
        yield from model.named_parameters()
        return
    merged = merged_state_dict(model)
    for name, _ in base_model(model).named_parameters():
        if ".lora_" in name:
            continue
        yield name.replace(".base_layer.", "."), merged[name.replace(".base_layer.", ".")]


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """The adapter weights alone (what a LoRA resume needs besides the unchanged base)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state_dict(model, state: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise RuntimeError(f"saved LoRA adapter does not fit this model; unexpected keys: {unexpected[:3]}")
