"""The fields of a run's configuration: typed dataclasses with a docstring (the string under each field) and
its allowed values, and `Config.finalize`, the one validation pass (ranges, the task and its options, the
algorithm's facts from its registries) and the one place derived values are computed. Loading YAML and
overrides, and the docs/config.md page, are gpg_vl/config.py's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from gpg_vl.config_rules import _rules, option
from gpg_vl.errors import ConfigError


def _engines() -> list[str]:
    """a registered rollout engine"""
    from gpg_vl.rollout import ENGINES

    return list(ENGINES)


def _decode_modes() -> tuple[str, ...]:
    """a decode loop of gpg_vl.decode"""
    from gpg_vl.decode import DECODE_MODES

    return DECODE_MODES


def _algorithms() -> list[str]:
    """a registered algorithm"""
    from gpg_vl.registry import available_algorithms

    return available_algorithms()


def _loss_aggs() -> tuple[str, ...]:
    """an aggregation mode of gpg_vl.algorithms.agg_loss"""
    from gpg_vl.algorithms import LOSS_AGG_MODES

    return LOSS_AGG_MODES


DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
OPTIMIZERS = ("adamw", "adamw_8bit")
LR_SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class LoraConfig:
    r: int = option(0, ge=0)
    """Adapter rank; 0 disables LoRA (full fine-tuning)."""
    alpha: int = option(16, gt=0)
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = option(0.0, ge=0, lt=1)
    """Dropout on the adapter input."""
    target_modules: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Module names that get adapters, matched in the language model only (the vision tower stays frozen)."""


@dataclass
class ModelConfig:
    name_or_path: str = "builtin:tiny-warm"
    """Hub id (Qwen/Qwen2-VL-2B-Instruct), local folder, or a built-in preset `builtin:<preset>`."""
    dtype: str = option("auto", choices=DTYPES)
    """Dtype of the weights themselves (and so of the optimizer state): float32 | bfloat16 | float16 |
    auto (float32 master weights with bf16 autocast on CUDA; float32 on CPU). bfloat16 halves weight and
    optimizer memory but rounds small updates away; see docs/memory.md."""
    attn_implementation: str = option("sdpa", choices=ATTN_IMPLEMENTATIONS)
    """Attention kernel passed to from_pretrained: sdpa | eager | flash_attention_2 (falls back to sdpa
    with a warning when flash-attn is not installed)."""
    min_pixels: int | None = option(None, ge=1)
    """Smallest image area (pixels) fed to the model; null: the model's saved image-processor setting."""
    max_pixels: int | None = option(None, ge=1)
    """Largest image area (pixels) fed to the model (bounds image tokens); null: the model's saved setting."""
    freeze_vision: bool = False
    """Keep the vision tower's weights fixed (only the language model and merger train)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    lora: LoraConfig = field(default_factory=lambda: LoraConfig())
    """LoRA adapters (peft); lora.r: 0 trains every weight (full fine-tuning)."""


@dataclass
class TaskConfig:
    name: str = option("shapes", note="a registered task, `pkg.module:Class` or `file.py:Class` (checked before loading)")
    """Registered task name, `pkg.module:Class` or `path/to/file.py:Class`."""
    options: dict = option(factory=dict, note="keywords of the task's `__init__` (checked before loading)")
    """Keyword options passed to the task's constructor (e.g. prompt_style: base); names are checked
    against its __init__ before anything loads."""
    train_data: str | None = None
    """Training data: hub id or local path; null uses the task's default."""
    train_split: str = "train"
    """Split of train_data used for training."""
    eval_data: str | None = None
    """Held-out data: hub id or local path; null uses the task's default."""
    eval_split: str = "test"
    """Split of eval_data used for held-out evaluation."""
    eval_limit: int | None = option(None, ge=1)
    """Evaluate on at most this many held-out examples (null: all)."""


@dataclass
class RolloutConfig:
    engine: str = option("hf", choices=_engines)
    """Rollout engine: hf (transformers generate) | vllm (CUDA only)."""
    group_size: int = option(8, ge=2, why="a group of one has no baseline")
    """G: completions sampled per prompt."""
    temperature: float = option(1.0, gt=0, why="greedy rollouts give every group equal rewards, so no step trains")
    """Sampling temperature for training rollouts."""
    top_p: float = option(1.0, gt=0, le=1)
    """Nucleus sampling threshold (1.0 disables it)."""
    top_k: int = option(0, ge=0)
    """Top-k sampling (0 disables it; transformers otherwise defaults to 50)."""
    max_new_tokens: int = option(256, ge=1)
    """Longest completion, in tokens."""
    batch_size: int = option(64, ge=1)
    """Sequences generated at once by the engine (a memory knob, not an algorithm one)."""
    decode: str = option("static", choices=_decode_modes)
    """hf engine only: the decode loop after each prompt is prefilled once. static: pre-allocated keys/values,
    one model call per token (on the CPU in float32: a cache of max_new_tokens slots for the completions,
    each prompt read once per group by group attention; elsewhere one cache of prompt + max_new_tokens
    slots per row); compiled: the same step under torch.compile (CUDA graphs on CUDA; on the CPU it keeps
    the packed weights and group attention in one graph: faster per rollout, but it compiles for 10-60 s at
    the first rollout and again once at the first new shape, and needs a C++ compiler); dynamic:
    transformers' DynamicCache grown by one column per token (the reference the others are tested against)."""
    vllm_gpu_memory_utilization: float = option(0.3, gt=0, le=1)
    """vLLM only: share of GPU memory the colocated engine may take."""
    vllm_max_images_per_prompt: int = option(1, ge=1)
    """vLLM only: most images one prompt may carry (SAT's two-image rows need 2)."""
    vllm_sleep: bool = False
    """vLLM only: release the engine's memory between rollouts (sleep level 1)."""
    vllm_kwargs: dict = field(default_factory=dict)
    """vLLM only: extra keyword arguments for vllm.LLM (e.g. max_model_len)."""
    vllm_parity_every: int = option(50, ge=0)
    """vLLM only: compare every prompt's token ids with the HF processor's at the first rollout and every N-th
    after (0: the first only); a mismatch stops the run before any gradient is taken."""


@dataclass
class AlgorithmConfig:
    name: str = option("gpg", choices=_algorithms)
    """Policy-gradient algorithm: gpg | grpo | dr_grpo | dapo | gspo | rloo | cispo, or one a plugin
    registers (see `plugin`)."""
    plugin: str | None = option(None, note="an existing .py file or an importable module")
    """A Python file (path/to/file.py) or module (pkg.module) imported before the config is checked, so
    the algorithms it registers with gpg_vl.algorithms' decorators can be named in `name`."""
    std_normalize: bool | None = option(None, note="true, false, or null for the algorithm's registered default")
    """Divide advantages by the group std (F_norm). null: the algorithm's registered default (off for gpg,
    dr_grpo and rloo, on for grpo, dapo, gspo and cispo); only algorithms registered with this option
    accept a value that differs."""
    loss_agg: str | None = option(None, choices=_loss_aggs)
    """token_mean | seq_mean | token_sum_norm. null: the algorithm's registered default."""
    min_valid_fraction: float = option(0.6, ge=0, le=1)
    """beta_th: resample prompts while the share of groups with non-equal rewards is below this."""
    max_resample_attempts: int = option(3, ge=0)
    """Extra rollout rounds allowed per step to reach min_valid_fraction."""
    valid_on: str = option("total", note="`total` or a reward component the task reports (checked at the first step)")
    """Reward component whose values decide whether a group is valid (not all equal) for beta_th, AGE's
    alpha and which groups are kept; `total` or a component the task reports (e.g. accuracy, so groups
    that differ only in format do not count). Advantages always use the total."""
    age: bool = True
    """Accurate gradient estimation: scale the loss by alpha = B / (B - M)."""
    clip_eps: float | None = option(None, gt=0, lt=1)
    """Lower clip range eps of the probability ratio, clip(r, 1 - eps, 1 + clip_eps_high). null: the
    algorithm's registered default (0.2; gspo 3e-4). Taken by grpo, dr_grpo, dapo, gspo."""
    clip_eps_high: float | None = option(None, gt=0)
    """Upper clip range. null: the algorithm's default (dapo 0.28, gspo 4e-4, cispo 5.0: CISPO's only bound,
    on its detached weight), else clip_eps. Taken by dapo, gspo, cispo."""
    kl_coef: float = option(0.0, ge=0)
    """Weight of the k3 KL penalty to a frozen reference model, loaded exactly when this is > 0
    (algorithms registered with kl_coef: grpo)."""
    num_iterations: int = option(1, ge=1)
    """Optimisation passes over each rollout batch; 1 keeps it on-policy (algorithms registered with
    num_iterations: grpo, dapo, gspo, cispo)."""
    rollout_correction: str = option("none", choices=("none", "tis"))
    """none | tis: weight every algorithm's per-token loss by min(pi_train / pi_rollout, tis_cap), the
    truncated importance ratio between the trainer's and the rollout engine's sampled-token log-probs."""
    tis_cap: float = option(2.0, gt=0)
    """Cap on the TIS weight (rollout_correction: tis)."""
    overlong_buffer: int = option(0, ge=0)
    """DAPO's soft overlong penalty, added to the reward: its L_cache in tokens (0: off). Lengths over
    overlong_max_length - overlong_buffer lose up to 1, linearly, and -1 past overlong_max_length."""
    overlong_max_length: int | None = option(None, ge=1)
    """DAPO's L_max for the overlong penalty. null: rollout.max_new_tokens."""


@dataclass
class OptimConfig:
    name: str = option("adamw", choices=OPTIMIZERS)
    """Optimizer: adamw (torch) | adamw_8bit (bitsandbytes, CUDA only: `pip install 'gpg-vl[gpu]'`)."""
    lr: float = option(1e-6, gt=0)
    """Peak learning rate of AdamW."""
    weight_decay: float = option(0.0, ge=0)
    """AdamW weight decay."""
    adam_betas: tuple = option((0.9, 0.999), items=2, ge=0, lt=1)
    """AdamW betas."""
    warmup_steps: int = option(0, ge=0)
    """Linear learning-rate warmup, in optimizer steps."""
    lr_schedule: str = option("constant", choices=LR_SCHEDULES)
    """constant | linear | cosine (decay after warmup to 0 at max_steps)."""
    max_grad_norm: float = option(1.0, ge=0)
    """Clip the global gradient norm to this (0 disables)."""
    micro_batch_size: int = option(8, ge=1)
    """Sequences per forward/backward; the loss is still normalised over the whole batch."""
    shared_prefix: bool = True
    """Training forward runs each prompt (and its images) once per micro-batch, its completions reading the
    shared keys/values (same log-probs and gradients, docs/performance.md); false: one prompt copy per
    completion, the reference path (always used with model.gradient_checkpointing, which drops the cache)."""


@dataclass
class TrainConfig:
    output_dir: str = "runs/gpg"
    """Run folder: metrics.jsonl, samples, checkpoint-STEP/."""
    max_steps: int = option(100, ge=0)
    """Optimizer steps to run."""
    prompts_per_step: int = option(8, ge=1)
    """B: prompts (groups) per optimizer step, summed over all processes."""
    seed: int = option(0, ge=0)
    """Seed for data order, sampling and initialisation."""
    train_limit: int | None = option(None, ge=1)
    """Use at most this many training examples (null: all)."""
    overwrite: bool = False
    """A fresh run into a folder that holds an earlier run deletes that run's files (config.yaml, logs, tb/,
    samples, checkpoint-N/) first; false (default): stop with an error instead. Other files are left alone."""
    on_nonfinite: str = option("stop", choices=("stop", "skip"))
    """A NaN/inf reward, loss or gradient norm: the step is not applied, then stop: end the run (exit 3, naming
    the step and the last good checkpoint); skip: go on and count it. Either way, non-finite weights or 5
    skipped steps in a row end the run. Default stop: divergence repeats, and a skip would hide it."""
    sharding: str = option("none", choices=("none", "fsdp"))
    """none: every process holds the whole model (DDP, or DeepSpeed ZeRO when launched with its config);
    fsdp: parameters, gradients and optimizer state sharded across processes with torch FSDP2 (also on CPU)."""


@dataclass
class LoggingConfig:
    log_every: int = option(1, ge=1)
    """Write metrics every N steps (metrics.jsonl always gets every step)."""
    tensorboard: bool = True
    """Write TensorBoard event files to output_dir/tb."""
    wandb: bool = False
    """Log to Weights & Biases (needs `pip install wandb`)."""
    wandb_project: str = "gpg-vl"
    """W&B project name."""
    sample_every: int = option(10, ge=0)
    """Every N steps write a few prompts, completions and rewards to samples.jsonl (0: never)."""
    num_samples: int = option(2, ge=1)
    """How many groups to write each time samples are logged."""
    progress_bar: bool = True
    """Show a tqdm progress bar with the key figures."""


@dataclass
class CheckpointConfig:
    save_every: int = option(50, ge=0)
    """Save a checkpoint every N steps (and always at the end); 0 saves only at the end."""
    keep_last: int = option(2, ge=0)
    """Keep the newest K checkpoints; older ones are deleted after a successful save (0 keeps them all)."""
    resume: str | None = None
    """Resume from a checkpoint folder, or `latest` for the newest in output_dir."""


@dataclass
class EvalConfig:
    every: int = option(0, ge=0)
    """Evaluate on the held-out split every N steps (0: only at the end when `at_end`)."""
    at_end: bool = True
    """Evaluate once after the last step."""
    at_start: bool = False
    """Evaluate once before the first step too (logged as step 0): the starting point of the curve."""
    batch_size: int = option(32, ge=1)
    """Prompts per generation batch during evaluation."""
    max_new_tokens: int | None = option(None, ge=1)
    """Completion limit for evaluation (null: rollout.max_new_tokens)."""
    controls: list = option(factory=list, choices=("blind", "shuffled"))
    """Visual-dependence controls scored beside the real images (docs/eval.md): `blind` (uniform grey images),
    `shuffled` (another example's images); logged as eval/<control>/<metric> and eval/visual_gain/<metric>.
    Each costs one more greedy pass."""


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
        """The one validation pass, before anything loads: every field against its Rule, the task and its
        options against the task registry, the algorithm against its registries, the cross-field rules;
        then fill derived values. Raises ConfigError naming the key."""
        algo = self.algorithm
        _import_algorithm_plugin(algo)  # a user's algorithms must be registered before `name` is checked
        for key, value, rule in _rules(self):
            problem = rule.violation(value)
            if problem:
                raise ConfigError(f"{key} {problem}", key)
        _check_task(self.task)
        _apply_algorithm_facts(algo)
        model = self.model
        if model.min_pixels is not None and model.max_pixels is not None and model.min_pixels > model.max_pixels:
            raise ConfigError(f"model.min_pixels ({model.min_pixels}) must be <= model.max_pixels ({model.max_pixels})", "model.min_pixels")
        if model.lora.r > 0 and not model.lora.target_modules:
            raise ConfigError("model.lora.target_modules must name at least one module when model.lora.r > 0", "model.lora.target_modules")
        if not algo.valid_on:
            raise ConfigError("algorithm.valid_on must name a reward component (or total)", "algorithm.valid_on")
        l_max = algo.overlong_max_length or self.rollout.max_new_tokens
        if algo.overlong_buffer > l_max:
            raise ConfigError(f"algorithm.overlong_buffer ({algo.overlong_buffer}) must be <= the overlong max length "
                              f"({l_max}, algorithm.overlong_max_length or rollout.max_new_tokens)", "algorithm.overlong_buffer")
        if self.eval.max_new_tokens is None:
            self.eval.max_new_tokens = self.rollout.max_new_tokens
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _import_algorithm_plugin(algo: AlgorithmConfig) -> None:
    from gpg_vl import registry

    try:
        if algo.plugin:
            registry.import_plugin(algo.plugin)
        registry.load_algorithm(algo.name)  # an entry point of that name registers it when imported
    except (FileNotFoundError, ImportError, SyntaxError, ValueError) as e:
        key = "algorithm.plugin" if algo.plugin else "algorithm.name"
        raise ConfigError(f"{key}: {e}", key) from None


def _check_task(task: TaskConfig) -> None:
    """The task resolves (its module is imported; no data is read) and every option is a constructor keyword."""
    from gpg_vl.registry import get_task_class, task_option_names

    try:
        cls = get_task_class(task.name)
    except (KeyError, FileNotFoundError, AttributeError, TypeError, ImportError) as e:
        raise ConfigError(f"task.name: {e.args[0] if e.args else e}", "task.name") from None
    accepted = task_option_names(cls)
    unknown = sorted(str(k) for k in task.options if str(k) not in accepted)
    if unknown:
        raise ConfigError(
            f"task.options: task {task.name!r} has no option {', '.join(unknown)}; "
            f"its options: {', '.join(sorted(accepted)) or '(none)'}", "task.options")


def _apply_algorithm_facts(algo: AlgorithmConfig) -> None:
    """Defaults and accepted options come from the algorithm's registration, whatever its name."""
    from gpg_vl import algorithms

    try:
        facts = algorithms.algorithm_spec(algo.name)
    except KeyError as e:
        raise ConfigError(f"algorithm.name: {e.args[0]}", "algorithm.name") from None
    clip_eps = facts.default("clip_eps")
    high = facts.default("clip_eps_high")
    defaults = AlgorithmConfig(std_normalize=facts.std_normalize, clip_eps=clip_eps, clip_eps_high=clip_eps if high is None else high)
    for name in algorithms.TUNABLE_OPTIONS:
        value = getattr(algo, name)
        if name not in facts.options and value is not None and value != getattr(defaults, name):
            takes = ", ".join(facts.options) or "none of them"
            shown = str(value).lower() if isinstance(value, bool) else value  # as written in YAML
            raise ConfigError(
                f"algorithm.{name}={shown} does not apply to {algo.name} (of {', '.join(algorithms.TUNABLE_OPTIONS)} "
                f"it takes {takes}); remove it", f"algorithm.{name}")
    if algo.std_normalize is None:
        algo.std_normalize = facts.std_normalize
    if algo.loss_agg is None:
        algo.loss_agg = facts.loss_agg
    if algo.clip_eps is None and "clip_eps" in facts.options:
        algo.clip_eps = clip_eps
    if algo.clip_eps_high is None and "clip_eps_high" in facts.options:
        algo.clip_eps_high = high if high is not None else algo.clip_eps  # null: symmetric
