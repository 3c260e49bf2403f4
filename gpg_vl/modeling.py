"""The one way gpg-vl loads a policy: a hub id, a local folder, or a built-in preset, with its processor.

`load_policy` reads everything from `ModelConfig`: the weights' dtype, the attention kernel (flash-attn falls
back to sdpa with a warning when it is missing), the pixel budget (resolved once, carried on the processor),
a frozen vision tower, gradient checkpointing and LoRA adapters (`gpg_vl.lora`). A built-in preset must be
built first (`gpg_vl.kit`); `gpg_vl.builtin` finds its folder, and this module only loads folders.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from gpg_vl import hub
from gpg_vl.config import DTYPES, ConfigError
from gpg_vl.builtin import BUILTIN_PREFIX, BUILTINS, ModelLoadError, cache_dir, resolve_model_path
from gpg_vl.processor import VISION_TOKENS, VLProcessor, image_processor_class, load_processor, save_processor

__all__ = [
    "BUILTINS", "BUILTIN_PREFIX", "ModelLoadError", "VISION_TOKENS", "VLProcessor", "cache_dir", "check_model_source",
    "check_update_resolution",
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


def inference_device() -> torch.device:
    """Where `gpg-vl eval` and the demo load a policy: this process's current CUDA device, else the CPU.
    (Training takes accelerate's device, which a launcher sets per rank.)"""
    return torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")


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
    if model_cfg.attn_implementation == "flash_attention_2" and (weights_dtype or torch_dtype(model_cfg.dtype, device)) == torch.float32 and model_cfg.dtype != "auto":
        raise ConfigError("model.attn_implementation=flash_attention_2 needs bf16/fp16 activations, but model.dtype=float32 runs fp32; use model.dtype=auto (bf16 autocast) or attn_implementation=sdpa")
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
    keep_checkpoint_names(model)
    model.to(device)
    if model_cfg.freeze_vision:  # the ViT stays fixed; its merger (the projection into the LM) trains
        tower = vision_tower(model)
        tower.requires_grad_(False)
        if getattr(tower, "merger", None) is not None:
            tower.merger.requires_grad_(True)
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    lora = getattr(model_cfg, "lora", None)
    if lora is not None and lora.r:
        from gpg_vl.lora import add_lora

        model = add_lora(model, lora)
    return model, processor


def keep_checkpoint_names(model) -> None:
    """Make `save_pretrained` write the key names a plain load reads back (`model.*`, `visual.*`).

    Trap (transformers 5.25): a load under ZeRO-3 records every legacy renaming on the model, and the save
    then reverts one twice, writing the language model as `model.model.*`. A plain load records only the
    model's own renamings, which is what is kept here."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled() and getattr(model, "_weight_conversions", None) is not None:
        from transformers.conversion_mapping import get_model_conversion_mapping

        model._weight_conversions = get_model_conversion_mapping(model, add_legacy=False)


def check_update_resolution(model, lr: float) -> None:
    """Refuse 16-bit weights trained at a learning rate their resolution rounds away.

    An Adam step moves a weight by about `lr`; a bf16 weight w changes only when that exceeds half its
    spacing, about |w| * eps / 2 (eps = 2^-7 for bf16). Judged at the median |w| of the trainable weights:
    below that, most updates vanish (measured: lr 1e-6 changed 1.4% of a bf16 model's elements)."""
    weights = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    if not weights or weights[0].dtype not in (torch.bfloat16, torch.float16):
        return
    sample = torch.cat([p.detach().flatten()[:: max(1, p.numel() // 4096)].abs().float() for p in weights])
    sample = sample[sample > 0]
    if not len(sample):
        return
    resolution = float(sample.median()) * torch.finfo(weights[0].dtype).eps / 2
    if lr < resolution:
        name = str(weights[0].dtype).replace("torch.", "")
        raise ConfigError(
            f"optim.lr={lr:g} is below the resolution of {name} weights (~{resolution:.1e} at their median "
            f"magnitude): most updates would round away; use model.dtype=auto (fp32 master weights) or a larger lr"
        )


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
    numel = lambda p: getattr(p, "ds_numel", None) or p.numel()  # noqa: E731 (ZeRO-3: a partition's numel is 0)
    total = sum(numel(p) for p in params)
    trainable = [p for p in params if p.requires_grad]
    n_train = sum(numel(p) for p in trainable)
    weight_dtype = str(trainable[0].dtype if trainable else params[0].dtype).replace("torch.", "")
    state = "8-bit" if optimizer_name == "adamw_8bit" else weight_dtype
    return (
        f"parameters: {n_train / 1e6:,.2f}M trainable of {total / 1e6:,.2f}M ({100 * n_train / max(total, 1):.1f}%); "
        f"weights {weight_dtype}, optimizer {optimizer_name} with {state} state"
    )
