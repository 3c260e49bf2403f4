"""The one way gpg-vl loads a policy: a hub id, a local folder, or a built-in preset, with its processor.

`load_policy` reads everything from `ModelConfig`: the weights' dtype, the attention kernel (flash-attn falls
back to sdpa with a warning when it is missing), the pixel budget (resolved once, carried on the processor),
a frozen vision tower, gradient checkpointing and LoRA adapters (`gpg_vl.lora`). Built-in presets are built
by `gpg_vl.builtin`; this module only loads folders.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from gpg_vl import hub
from gpg_vl.config import DTYPES
from gpg_vl.builtin import BUILTIN_PREFIX, BUILTINS, ModelLoadError, cache_dir, resolve_model_path
from gpg_vl.processor import VISION_TOKENS, VLProcessor, image_processor_class, load_processor, save_processor

__all__ = [
    "BUILTINS", "BUILTIN_PREFIX", "ModelLoadError", "VISION_TOKENS", "VLProcessor", "cache_dir", "check_model_source",
    "describe_parameters", "image_processor_class", "load_policy", "load_processor", "resolve_attn_implementation",
    "resolve_model_path", "save_processor", "torch_dtype", "vision_tower",
]


def _advice(path: str) -> str:
    return (
        "If this machine has no hub access, download the weights elsewhere "
        f"(`huggingface-cli download {path} --local-dir DIR`) and set model.name_or_path=DIR."
    )


def check_model_source(path: str) -> bool:
    """Fail in a second when a hub model can be neither reached nor found in the cache.

    Returns True when loading must use the local cache only (hub unreachable, repo cached).
    """
    if not hub.is_hub_id(path) or hub.reachable(path):
        return False
    if not hub.is_cached(path):
        raise ModelLoadError(f"model {path!r} is not a local folder, the hub cannot be reached, and it is not cached.\n{_advice(path)}")
    return True


def torch_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on CUDA and float32 on the CPU (for inference; training keeps fp32 masters then)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, name, None) if name in DTYPES else None  # the names config.DTYPES allows
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"model.dtype must be one of {', '.join(DTYPES)}; got {name!r}")
    return dtype


def resolve_attn_implementation(name: str) -> str:
    """`flash_attention_2` only when flash-attn is importable (it is not a dependency); else sdpa, said once."""
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        warnings.warn(
            "model.attn_implementation=flash_attention_2 but flash-attn is not installed; using sdpa "
            "(`pip install flash-attn` on a CUDA machine to use it)",
            stacklevel=2,
        )
        return "sdpa"
    return name


def load_policy(model_cfg, device: torch.device | str = "cpu", weights_dtype: torch.dtype | None = None):
    """(model, processor) for a `ModelConfig`: hub id, local folder or builtin preset, on `device`.

    `weights_dtype` overrides `model_cfg.dtype` (the trainer keeps fp32 masters under bf16 autocast).
    With `model_cfg.lora.r > 0` the model comes back as a peft model with fresh adapters.
    """
    device = torch.device(device)
    path = resolve_model_path(model_cfg.name_or_path)
    local = Path(path).expanduser()
    if path.startswith((".", "/", "~")) and not local.exists():
        raise ModelLoadError(f"model folder not found: {path}")
    if local.is_dir() and not (local / "config.json").exists():
        raise ModelLoadError(f"{path} is not a model folder: it has no config.json")
    try:
        local_only = check_model_source(path)
        AutoConfig.from_pretrained(path, local_files_only=local_only)  # fails fast, before any weight download
        model = AutoModelForImageTextToText.from_pretrained(
            path,
            dtype=weights_dtype or torch_dtype(model_cfg.dtype, device),
            attn_implementation=resolve_attn_implementation(model_cfg.attn_implementation),
            local_files_only=local_only,
        )
        processor = load_processor(path, model_cfg.min_pixels, model_cfg.max_pixels, local_files_only=local_only)
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(
            f"could not load model {path!r}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}\n{_advice(path)}"
        ) from None
    if not processor.tokenizer.chat_template:
        raise ModelLoadError(
            f"the tokenizer of {path!r} has no chat template (a base model?). Copy the Instruct model's template "
            "into its folder, e.g. `huggingface-cli download Qwen/Qwen2-VL-2B-Instruct chat_template.json "
            "tokenizer_config.json --local-dir DIR` (as VisualThinker's prepare_2B_base.sh does), then set "
            "model.name_or_path=DIR"
        )
    model.to(device)
    if model_cfg.freeze_vision:
        vision_tower(model).requires_grad_(False)
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    lora = getattr(model_cfg, "lora", None)
    if lora is not None and lora.r:
        from gpg_vl.lora import add_lora

        model = add_lora(model, lora)
    return model, processor


def vision_tower(model) -> torch.nn.Module:
    """The ViT of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL model (its attribute path moved between versions)."""
    inner = model
    while not hasattr(inner, "visual") and not hasattr(inner, "vision_tower"):
        if not hasattr(inner, "model"):
            raise AttributeError(f"{type(model).__name__} has no vision tower attribute")
        inner = inner.model  # PeftModel.base_model.model ... -> Qwen2VLModel
    return getattr(inner, "visual", None) or getattr(inner, "vision_tower")


def describe_parameters(model, optimizer_name: str) -> str:
    """One start-up line: trainable and total parameter counts, weight dtype and optimizer-state dtype."""
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    trainable = [p for p in params if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    weight_dtype = str(trainable[0].dtype if trainable else params[0].dtype).replace("torch.", "")
    state = "8-bit" if optimizer_name == "adamw_8bit" else weight_dtype
    return (
        f"parameters: {n_train / 1e6:,.2f}M trainable of {total / 1e6:,.2f}M ({100 * n_train / max(total, 1):.1f}%); "
        f"weights {weight_dtype}, optimizer {optimizer_name} with {state} state"
    )
