"""The whole run configuration as typed dataclasses, filled from YAML then `dotted.key=value` overrides.

One source of truth: every field has a docstring (the string under it), unknown keys and wrong types fail
with the key and the file named, and derived values are computed in `Config.finalize()` alone.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override that names an unknown key or a value of the wrong type."""


@dataclass
class LoraConfig:
    r: int = 0
    """Adapter rank; 0 disables LoRA (full fine-tuning)."""
    alpha: int = 16
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Module names that get adapters, matched in the language model only (the vision tower stays frozen)."""


@dataclass
class ModelConfig:
    name_or_path: str = "builtin:tiny-warm"
    """Hub id (Qwen/Qwen2-VL-2B-Instruct), local folder, or a built-in preset `builtin:<preset>`."""
    dtype: str = "auto"
    """Dtype of the weights themselves (and so of the optimizer state): float32 | bfloat16 | float16 |
    auto (float32 master weights with bf16 autocast on CUDA; float32 on CPU). bfloat16 halves weight and
    optimizer memory but rounds small updates away; see docs/memory.md."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to from_pretrained: sdpa | eager | flash_attention_2 (falls back to sdpa
    with a warning when flash-attn is not installed)."""
    min_pixels: int | None = None
    """Smallest image area (pixels) fed to the model; null: the model's saved image-processor setting."""
    max_pixels: int | None = None
    """Largest image area (pixels) fed to the model (bounds image tokens); null: the model's saved setting."""
    freeze_vision: bool = False
    """Keep the vision tower's weights fixed (only the language model and merger train)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    lora: LoraConfig = field(default_factory=lambda: LoraConfig())
    """LoRA adapters (peft); lora.r: 0 trains every weight (full fine-tuning)."""


@dataclass
class TaskConfig:
    name: str = "shapes"
    """Registered task name, `pkg.module:Class` or `path/to/file.py:Class`."""
    options: dict = field(default_factory=dict)
    """Keyword options passed to the task's constructor (e.g. prompt_style: base)."""
    train_data: str | None = None
    """Training data: hub id or local path; null uses the task's default."""
    train_split: str = "train"
    """Split of train_data used for training."""
    eval_data: str | None = None
    """Held-out data: hub id or local path; null uses the task's default."""
    eval_split: str = "test"
    """Split of eval_data used for held-out evaluation."""
    eval_limit: int | None = None
    """Evaluate on at most this many held-out examples (null: all)."""


@dataclass
class RolloutConfig:
    engine: str = "hf"
    """Rollout engine: hf (transformers generate) | vllm (CUDA only)."""
    group_size: int = 8
    """G: completions sampled per prompt."""
    temperature: float = 1.0
    """Sampling temperature for training rollouts."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1.0 disables it)."""
    top_k: int = 0
    """Top-k sampling (0 disables it; transformers otherwise defaults to 50)."""
    max_new_tokens: int = 256
    """Longest completion, in tokens."""
    batch_size: int = 64
    """Sequences generated at once by the engine (a memory knob, not an algorithm one)."""
    vllm_gpu_memory_utilization: float = 0.3
    """vLLM only: share of GPU memory the colocated engine may take."""
    vllm_max_images_per_prompt: int = 1
    """vLLM only: most images one prompt may carry (SAT's two-image rows need 2)."""
    vllm_sleep: bool = False
    """vLLM only: release the engine's memory between rollouts (sleep level 1)."""
    vllm_kwargs: dict = field(default_factory=dict)
    """vLLM only: extra keyword arguments for vllm.LLM (e.g. max_model_len)."""


@dataclass
class AlgorithmConfig:
    name: str = "gpg"
    """Policy-gradient algorithm: gpg | grpo | dr_grpo."""
    std_normalize: bool | None = None
    """Divide advantages by the group std (F_norm). null: the algorithm's default (off for gpg/dr_grpo, on for grpo)."""
    loss_agg: str | None = None
    """token_mean | seq_mean | token_sum_norm. null: the algorithm's default."""
    min_valid_fraction: float = 0.6
    """beta_th: resample prompts while the share of groups with non-equal rewards is below this."""
    max_resample_attempts: int = 3
    """Extra rollout rounds allowed per step to reach min_valid_fraction."""
    age: bool = True
    """Accurate gradient estimation: scale the loss by alpha = B / (B - M)."""
    clip_eps: float = 0.2
    """GRPO: PPO clip range for the probability ratio."""
    kl_coef: float = 0.0
    """GRPO: weight of the k3 KL penalty to a frozen reference model (0 loads no reference)."""
    num_iterations: int = 1
    """GRPO: optimisation passes over each rollout batch (1 keeps it on-policy)."""


@dataclass
class OptimConfig:
    name: str = "adamw"
    """Optimizer: adamw (torch) | adamw_8bit (bitsandbytes, CUDA only: `pip install 'gpg-vl[gpu]'`)."""
    lr: float = 1e-6
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_betas: tuple = (0.9, 0.999)
    """AdamW betas."""
    warmup_steps: int = 0
    """Linear learning-rate warmup, in optimizer steps."""
    lr_schedule: str = "constant"
    """constant | linear | cosine (decay after warmup to 0 at max_steps)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    micro_batch_size: int = 8
    """Sequences per forward/backward; the loss is still normalised over the whole batch."""


@dataclass
class TrainConfig:
    output_dir: str = "runs/gpg"
    """Run folder: metrics.jsonl, samples, checkpoint-STEP/."""
    max_steps: int = 100
    """Optimizer steps to run."""
    prompts_per_step: int = 8
    """B: prompts (groups) per optimizer step, summed over all processes."""
    seed: int = 0
    """Seed for data order, sampling and initialisation."""
    train_limit: int | None = None
    """Use at most this many training examples (null: all)."""


@dataclass
class LoggingConfig:
    log_every: int = 1
    """Write metrics every N steps (metrics.jsonl always gets every step)."""
    tensorboard: bool = True
    """Write TensorBoard event files to output_dir/tb."""
    wandb: bool = False
    """Log to Weights & Biases (needs `pip install wandb`)."""
    wandb_project: str = "gpg-vl"
    """W&B project name."""
    sample_every: int = 10
    """Every N steps write a few prompts, completions and rewards to samples.jsonl (0: never)."""
    num_samples: int = 2
    """How many groups to write each time samples are logged."""
    progress_bar: bool = True
    """Show a tqdm progress bar with the key figures."""


@dataclass
class CheckpointConfig:
    save_every: int = 50
    """Save a checkpoint every N steps (and always at the end); 0 saves only at the end."""
    keep_last: int = 2
    """Keep the newest K checkpoints; older ones are deleted after a successful save."""
    resume: str | None = None
    """Resume from a checkpoint folder, or `latest` for the newest in output_dir."""


@dataclass
class EvalConfig:
    every: int = 0
    """Evaluate on the held-out split every N steps (0: only at the end when `at_end`)."""
    at_end: bool = True
    """Evaluate once after the last step."""
    batch_size: int = 32
    """Prompts per generation batch during evaluation."""
    max_new_tokens: int | None = None
    """Completion limit for evaluation (null: rollout.max_new_tokens)."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def finalize(self) -> "Config":
        """Check cross-field rules and fill derived values; the one place where that happens."""
        algo = self.algorithm
        if algo.name not in ("gpg", "grpo", "dr_grpo"):
            raise ConfigError(f"algorithm.name must be one of gpg, grpo, dr_grpo; got {algo.name!r}")
        if algo.std_normalize is None:
            algo.std_normalize = algo.name == "grpo"
        if algo.loss_agg is None:
            algo.loss_agg = {"gpg": "token_mean", "grpo": "seq_mean", "dr_grpo": "token_sum_norm"}[algo.name]
        if algo.name != "grpo" and (algo.kl_coef or algo.num_iterations != 1):
            raise ConfigError(f"algorithm.kl_coef and num_iterations apply to grpo only, not {algo.name}")
        if not 0.0 <= algo.min_valid_fraction <= 1.0:
            raise ConfigError("algorithm.min_valid_fraction must be in [0, 1]")
        if self.rollout.group_size < 2:
            raise ConfigError("rollout.group_size must be >= 2: a group of one has no baseline")
        if self.train.prompts_per_step < 1 or self.train.max_steps < 0:
            raise ConfigError("train.prompts_per_step must be >= 1 and train.max_steps >= 0")
        if self.eval.max_new_tokens is None:
            self.eval.max_new_tokens = self.rollout.max_new_tokens
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- loading ------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting only the safe cases (int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: '{key}' must be {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
    elif tp is tuple or origin is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(value)
    elif tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    else:
        return value
    raise ConfigError(f"{where}: '{key}' must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _apply(obj: Any, data: dict, prefix: str, where: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"{where}: unknown key '{dotted}'; valid keys here: {', '.join(sorted(names))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: '{dotted}' is a section and needs a mapping, got {value!r}")
            _apply(current, value, f"{dotted}.", where)
        else:
            setattr(obj, key, _coerce(value, hints[key], dotted, where))


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value read as YAML: 3 is int, 0.5 float, true bool, null None, [1, 2] list)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like dotted.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):
        try:
            value = float(raw)  # YAML 1.1 reads 1e-3 as a string
        except ValueError:
            value = raw
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file (if any) <- `dotted.key=value` overrides, then `finalize()`."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        _apply(cfg, data, "", str(path))
    for text in overrides:
        key, value = parse_override(text)
        nested: Any = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        _apply(cfg, nested, "", f"command-line override '{text}'")
    try:
        return cfg.finalize()
    except ConfigError as e:
        raise ConfigError(f"{path or 'defaults'}: {e}") from None


def field_docs(section: type) -> dict[str, str]:
    """Field name -> docstring, read from the source (used by `--help` and the README)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(section))
    docs, body = {}, tree.body[0].body
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = nxt.value.value
    return docs
