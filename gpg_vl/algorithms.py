"""Group advantages and policy losses for GPG (Chu et al., arXiv 2504.02546) and its baselines GRPO, Dr.GRPO,
DAPO, GSPO, RLOO and CISPO.

One `AlgorithmSpec` per name used in YAML, CLI and logs, in `ALGORITHMS`; the trainer calls every one the
same way through `compute_advantages` and `compute_policy_loss` (which also applies the optional rollout
correction, TIS). Layout: B prompts x G completions, group-contiguous (prompt 0's G completions first).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

LOSS_AGG_MODES = ("token_mean", "seq_mean", "token_sum_norm")
#: `algorithm.*` config fields that only some algorithms use; each registration says which ones it takes.
TUNABLE_OPTIONS = ("std_normalize", "clip_eps", "clip_eps_high", "kl_coef", "num_iterations")
#: What an option is when the algorithm registers no default for it (clip_eps_high: null = clip_eps).
OPTION_DEFAULTS = {"clip_eps": 0.2, "clip_eps_high": None}
ROLLOUT_CORRECTIONS = ("none", "tis")


@dataclass(frozen=True)
class AlgorithmSpec:
    """Everything the trainer and the config know about one algorithm: its advantage estimator and policy
    loss (each None until registered), their defaults, and which of TUNABLE_OPTIONS it accepts."""

    name: str
    advantage: Callable | None = None
    std_normalize: bool = False  # default F_norm: divide advantages by the group std
    advantage_options: tuple[str, ...] = ()
    loss: Callable | None = None
    loss_agg: str = "token_mean"  # default aggregation mode
    loss_options: tuple[str, ...] = ()
    option_defaults: tuple[tuple[str, float], ...] = ()  # e.g. (("clip_eps_high", 0.28),) for dapo

    @property
    def options(self) -> tuple[str, ...]:
        return tuple(o for o in TUNABLE_OPTIONS if o in self.advantage_options + self.loss_options)

    def default(self, option: str):
        """The algorithm's own default for clip_eps / clip_eps_high, else OPTION_DEFAULTS'."""
        return dict(self.option_defaults).get(option, OPTION_DEFAULTS.get(option))


#: The one registry: name -> AlgorithmSpec. Registering a half replaces the entry (specs are frozen).
ALGORITHMS: dict[str, AlgorithmSpec] = {}


def _check_options(name: str, options, allowed: tuple[str, ...]) -> tuple[str, ...]:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"algorithm {name!r}: unknown options {unknown}; valid: {', '.join(allowed)}")
    return tuple(options)


def register_advantage(name: str, *, std_normalize: bool = False, options=("std_normalize",)):
    """Decorator: `fn(rewards [B*G], *, group_size, std_normalize, eps, atol) -> advantages [B*G]`.

    `std_normalize` is the algorithm's default F_norm choice (the config's `algorithm.std_normalize: null`
    takes it); drop "std_normalize" from `options` when the estimator has only one form (dr_grpo)."""
    options = _check_options(name, options, ("std_normalize",))

    def decorate(fn):
        spec = ALGORITHMS.get(name, AlgorithmSpec(name))
        if spec.advantage is not None:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        ALGORITHMS[name] = replace(spec, advantage=fn, std_normalize=std_normalize, advantage_options=options)
        return fn

    return decorate


def register_policy_loss(name: str, loss_agg: str = "token_mean", options=(), defaults: dict | None = None):
    """Decorator: `fn(logprobs, advantages, mask, *, old_logprobs, ref_logprobs, clip_eps, clip_eps_high,
    kl_coef)` -> (per-token loss [B*G, L], metrics). `compute_policy_loss` aggregates it (`loss_agg` is the
    default mode).

    The trainer passes every keyword to every loss (take `**_` for those you ignore); `options` names the
    ones among clip_eps, clip_eps_high, kl_coef, num_iterations the loss really uses, so the config rejects
    the others instead of silently ignoring them, and loads a reference model exactly when kl_coef > 0.
    `defaults` sets this algorithm's own clip_eps / clip_eps_high (the config's null takes them)."""
    if loss_agg not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss_agg {loss_agg!r}; valid: {', '.join(LOSS_AGG_MODES)}")
    options = _check_options(name, options, TUNABLE_OPTIONS[1:])
    defaults = dict(defaults or {})
    _check_options(name, defaults, tuple(OPTION_DEFAULTS))

    def decorate(fn):
        spec = ALGORITHMS.get(name, AlgorithmSpec(name))
        if spec.loss is not None:
            raise ValueError(f"policy loss {name!r} is already registered")
        ALGORITHMS[name] = replace(spec, loss=fn, loss_agg=loss_agg, loss_options=options,
                                   option_defaults=tuple(sorted(defaults.items())))
        return fn

    return decorate


def registered_algorithms() -> list[str]:
    """Names registered here as both an advantage estimator and a policy loss, sorted (gpg_vl.registry's
    `available_algorithms` adds those an installed package offers by entry point)."""
    return sorted(n for n, s in ALGORITHMS.items() if s.advantage is not None and s.loss is not None)


def algorithm_spec(name: str) -> AlgorithmSpec:
    """The complete spec of `name`; KeyError naming the valid algorithms (or the missing half)."""
    if name not in ALGORITHMS:
        raise KeyError(f"unknown algorithm {name!r}; valid names: {', '.join(registered_algorithms())}")
    spec = ALGORITHMS[name]
    for part, kind, decorator in (("advantage", "advantage estimator", "register_advantage"),
                                  ("loss", "policy loss", "register_policy_loss")):
        if getattr(spec, part) is None:
            raise KeyError(f"algorithm {name!r} has no {kind}; register one with @algorithms.{decorator}({name!r})")
    return spec


def _lookup(name: str, part: str, kind: str) -> Callable:
    fn = getattr(ALGORITHMS[name], part) if name in ALGORITHMS else None
    if fn is None:
        valid = sorted(n for n, s in ALGORITHMS.items() if getattr(s, part) is not None)
        raise KeyError(f"unknown {kind} {name!r}; valid names: {', '.join(valid)}")
    return fn


# ---------------------------------------------------------------- groups, AGE alpha, beta_th


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B*G] -> [B, G]; a group of one has no baseline, so G >= 2."""
    if group_size < 2 or rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D [B*G] with group_size >= 2; got {tuple(rewards.shape)}, G={group_size}")
    return rewards.view(-1, group_size)


def valid_group_mask(rewards: torch.Tensor, group_size: int, atol: float = 1e-6) -> torch.Tensor:
    """BoolTensor [B]: True where a group's rewards are not all equal (max - min > atol).

    The absolute tolerance makes continuous rewards (IoU) that differ only by float noise count as equal."""
    grouped = _grouped(rewards, group_size)  # [B, G]
    return (grouped.amax(-1) - grouped.amin(-1)) > atol


def valid_group_fraction(rewards: torch.Tensor, group_size: int, atol: float = 1e-6) -> float:
    """(B - M) / B, where M counts zero-variance groups (GPG Sec. "Accurate Gradient Estimation")."""
    return float(valid_group_mask(rewards, group_size, atol).float().mean())


def age_alpha(valid_fraction: float) -> float:
    """AGE's alpha = B / (B - M) = 1 / valid_fraction.

    Zero-variance groups carry no gradient but still count in the token mean, shrinking the update by
    (B - M) / B; alpha undoes that. When every group is zero-variance there is no gradient at all, and we
    return 0.0 so the loss is exactly 0 and finite (the trainer skips such a step)."""
    if not 0.0 <= valid_fraction <= 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1], got {valid_fraction}")
    return 1.0 / valid_fraction if valid_fraction > 0 else 0.0


def needs_resampling(valid_fraction: float, beta_th: float) -> bool:
    """GPG's threshold beta_th: roll out more prompts while the valid fraction (B - M) / B is below it."""
    return valid_fraction < beta_th


# ---------------------------------------------------------------- advantage estimators


def compute_advantages(
    name: str, rewards: torch.Tensor, *, group_size: int, std_normalize: bool | None = None,
    eps: float = 1e-6, atol: float = 1e-6,
) -> torch.Tensor:
    """advantages [B*G] from rewards [B*G]; std_normalize=None takes the algorithm's own default."""
    estimator = _lookup(name, "advantage", "advantage estimator")
    std_normalize = ALGORITHMS[name].std_normalize if std_normalize is None else std_normalize
    return estimator(rewards, group_size=group_size, std_normalize=std_normalize, eps=eps, atol=atol)


def _group_relative(rewards, group_size, std_normalize, eps, atol) -> torch.Tensor:
    """A_i = (r_i - mean_group(r)) / F_norm, F_norm = 1 or std_group(r) + eps (unbiased, as torch.std).

    Groups that `valid_group_mask` calls zero-variance get exactly 0, so near-equal continuous rewards are
    not blown up by a tiny std and the groups that carry gradient are exactly the (B - M) AGE counts."""
    rewards = rewards if rewards.is_floating_point() else rewards.float()
    grouped = _grouped(rewards, group_size)  # [B, G]
    advantages = grouped - grouped.mean(-1, keepdim=True)  # [B, G]
    if std_normalize:
        advantages = advantages / (grouped.std(-1, keepdim=True) + eps)
    valid = valid_group_mask(rewards, group_size, atol)  # [B]
    return (advantages * valid.unsqueeze(-1)).flatten()  # [B*G]


@register_advantage("gpg", std_normalize=False)
def compute_gpg_advantages(rewards, *, group_size, std_normalize=False, eps=1e-6, atol=1e-6):
    """GPG: F_norm = 1 by default (the paper's choice); std normalisation is an option."""
    return _group_relative(rewards, group_size, std_normalize, eps, atol)


@register_advantage("grpo", std_normalize=True)
def compute_grpo_advantages(rewards, *, group_size, std_normalize=True, eps=1e-6, atol=1e-6):
    """GRPO (Shao et al. 2024): (r - mean) / (std + eps) within each group."""
    return _group_relative(rewards, group_size, std_normalize, eps, atol)


@register_advantage("dr_grpo", std_normalize=False, options=())
def compute_dr_grpo_advantages(rewards, *, group_size, std_normalize=False, eps=1e-6, atol=1e-6):
    """Dr.GRPO (Liu et al. 2025): r - mean; dropping the std division is what defines it."""
    if std_normalize:
        raise ValueError("dr_grpo does not divide by the group std; use grpo for std-normalised advantages")
    return _group_relative(rewards, group_size, False, eps, atol)


@register_advantage("rloo", std_normalize=False, options=())
def compute_rloo_advantages(rewards, *, group_size, std_normalize=False, eps=1e-6, atol=1e-6):
    """RLOO (Kool et al. 2019; Ahmadian et al. 2024): r_i minus the mean of the group's OTHER G-1 rewards,
    = G / (G-1) * (r_i - group mean): the unbiased form of GPG's baseline, whose expected gradient is
    (G-1)/G of the true one. Equal-reward groups get exactly 0, as everywhere."""
    return _group_relative(rewards, group_size, False, eps, atol) * (group_size / (group_size - 1))


# dapo, gspo and cispo take GRPO's advantage (r - mean) / (std + eps) as their papers do.
for _name in ("dapo", "gspo", "cispo"):
    register_advantage(_name, std_normalize=True)(compute_grpo_advantages)
del _name


def verl_gpg_alpha(rewards: torch.Tensor) -> float:
    """verl's `gpg` alpha: (number of samples) / (samples whose raw reward is nonzero), clamped at 1 sample.

    Not the paper's B / (B - M): it counts samples, not groups, and a sample, not a group, is "valid" when its
    reward is nonzero, so an all-correct group raises it and a mixed group's zero-reward samples count as
    invalid. Shown beside `age_alpha` in docs/algorithms.md; gpg-vl trains with the paper's."""
    return rewards.numel() / max(int(torch.count_nonzero(rewards)), 1)


def overlong_penalty(length: int, max_length: int, buffer: int) -> float:
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13), added to the reward: 0 up to
    max_length - buffer tokens, then falling linearly to -1 at max_length, and -1 beyond it."""
    if not 0 < buffer <= max_length:
        raise ValueError(f"overlong buffer must be in (0, max_length={max_length}], got {buffer}")
    free = max_length - buffer
    if length <= free:
        return 0.0
    return (free - length) / buffer if length <= max_length else -1.0


# ---------------------------------------------------------------- aggregation


def agg_loss(
    loss_mat: torch.Tensor, response_mask: torch.Tensor, mode: str, *,
    total_tokens=None, total_sequences=None, max_response_length: int | None = None,
) -> torch.Tensor:
    """Scalar from a per-token loss [N, L] over trained tokens (response_mask [N, L]).

    token_mean:     sum over tokens / number of tokens (GPG's 1 / sum_i |o_i|)
    seq_mean:       mean over each sequence's tokens, then sum / number of sequences (GRPO)
    token_sum_norm: sum over tokens / (number of sequences * max_response_length) (Dr.GRPO)
    The counts default to this batch's own; with micro-batching pass the whole batch's `total_tokens` /
    `total_sequences` so the micro-batch losses sum exactly to the full-batch loss."""
    mask = response_mask.bool()
    # Trap: padded positions may hold -inf or NaN log-probs, and NaN * 0 is NaN; select, don't multiply.
    masked = torch.where(mask, loss_mat, torch.zeros_like(loss_mat))  # [N, L]
    n_seq = loss_mat.shape[0] if total_sequences is None else total_sequences
    if mode == "token_mean":
        n_tok = mask.sum() if total_tokens is None else total_tokens
        return masked.sum() / torch.as_tensor(n_tok, dtype=masked.dtype, device=masked.device).clamp(min=1)
    if mode == "seq_mean":
        per_seq = masked.sum(-1) / mask.sum(-1).clamp(min=1)  # [N]; an empty sequence counts as 0
        return per_seq.sum() / max(n_seq, 1)
    if mode == "token_sum_norm":
        width = loss_mat.shape[-1] if max_response_length is None else max_response_length
        return masked.sum() / max(n_seq * width, 1)
    raise ValueError(f"unknown loss_agg {mode!r}; valid: {', '.join(LOSS_AGG_MODES)}")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    values = values.detach().expand_as(mask)
    return float(torch.where(mask, values, torch.zeros_like(values)).sum() / mask.sum().clamp(min=1))


# ---------------------------------------------------------------- policy losses


def compute_policy_loss(
    name: str, logprobs: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor, *,
    alpha: float = 1.0, loss_agg: str | None = None, total_tokens=None, total_sequences=None,
    max_response_length: int | None = None, rollout_logprobs: torch.Tensor | None = None,
    rollout_correction: str = "none", tis_cap: float = 2.0, **loss_options,
) -> tuple[torch.Tensor, dict[str, float]]:
    """loss = alpha * agg(w * per-token loss of `name`), plus python-float metrics for logging.

    logprobs, response_mask (and old_logprobs, ref_logprobs in `loss_options`, rollout_logprobs): [B*G, L];
    advantages: [B*G] (one per completion, broadcast over its tokens) or [B*G, L].
    loss_agg=None takes the algorithm's default (gpg: token_mean, grpo: seq_mean, dr_grpo: token_sum_norm).
    rollout_correction="tis": w = min(exp(old - rollout_logprobs), tis_cap), detached, per token (truncated
    importance sampling from the engine's sampling distribution to the trainer's; old = the trainer's
    log-probs before this step's update, `old_logprobs`, else logprobs.detach()); "none": w = 1."""
    loss_fn = _lookup(name, "loss", "policy loss")
    if logprobs.shape != response_mask.shape or advantages.shape[0] != logprobs.shape[0]:
        raise ValueError(f"shape mismatch: logprobs {tuple(logprobs.shape)}, response_mask "
                         f"{tuple(response_mask.shape)}, advantages {tuple(advantages.shape)}")
    mask = response_mask.bool()  # [B*G, L]
    advantages = advantages.detach()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)  # [B*G, 1]
    loss_mat, metrics = loss_fn(logprobs, advantages, mask, **loss_options)  # [B*G, L]
    if rollout_correction == "tis":
        weights = tis_weights(loss_options.get("old_logprobs"), logprobs, rollout_logprobs, mask, tis_cap)
        loss_mat = loss_mat * weights
        metrics.update(tis_weight_mean=_masked_mean(weights, mask), tis_capped_fraction=_masked_mean((weights >= tis_cap).float(), mask))
    elif rollout_correction != "none":
        raise ValueError(f"unknown rollout_correction {rollout_correction!r}; valid: {', '.join(ROLLOUT_CORRECTIONS)}")
    mode = ALGORITHMS[name].loss_agg if loss_agg is None else loss_agg
    agg = agg_loss(loss_mat, mask, mode, total_tokens=total_tokens, total_sequences=total_sequences,
                   max_response_length=max_response_length)
    # alpha = 0 (no valid group) gives an exact, finite 0 since the aggregated loss is finite.
    loss = alpha * agg
    metrics.update(policy_loss=float(loss.detach()), alpha=float(alpha),
                   adv_abs_mean=_masked_mean(advantages.abs(), mask))
    return loss, metrics


def tis_weights(old_logprobs, logprobs, rollout_logprobs, mask, cap: float) -> torch.Tensor:
    """Truncated importance weights [B*G, L]: min(pi_train / pi_rollout, cap) per sampled token, 0 on padding."""
    if rollout_logprobs is None:
        raise ValueError("rollout_correction='tis' needs rollout_logprobs (the engine's sampled-token log-probs)")
    if cap <= 0:
        raise ValueError(f"tis_cap must be > 0, got {cap}")
    old = logprobs.detach() if old_logprobs is None else old_logprobs.detach()
    delta = torch.where(mask, old - rollout_logprobs.to(old.device, old.dtype), torch.zeros_like(old))
    return torch.exp(delta).clamp(max=cap)  # detached: a weight, not a path for gradients


def mismatch_stats(trainer_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor) -> tuple[float, float, int]:
    """(sum, max, count) of |trainer - rollout| log-prob over the masked completion tokens, for
    `rollout/mismatch_mean` and `rollout/mismatch_max` (sums so micro-batches and ranks combine exactly)."""
    mask = mask.bool()
    delta = (trainer_logprobs.detach().float() - rollout_logprobs.to(trainer_logprobs.device).float()).abs()[mask]
    return float(delta.sum()), float(delta.max()) if delta.numel() else 0.0, int(delta.numel())


@register_policy_loss("gpg", loss_agg="token_mean")
def gpg_policy_loss(logprobs, advantages, mask, *, old_logprobs=None, ref_logprobs=None, clip_eps=0.2,
                    kl_coef=0.0, **_):
    """GPG (arXiv 2504.02546): the plain policy-gradient surrogate, per token -A_i * log pi(o_i,t | q, o_i,<t).

    No ratio, no clip, no KL, no reference: GPG optimises the original objective with one gradient step per
    rollout, so old_logprobs / clip_eps / ref_logprobs are accepted for a uniform call and ignored."""
    if kl_coef:
        raise ValueError("gpg has no KL term; set kl_coef=0 (use grpo for a KL-regularised loss)")
    return -advantages * logprobs, {}  # [B*G, L]


def _ratio(logprobs, old_logprobs, mask):
    """r = exp(logprobs - old_logprobs) per token [B*G, L]; old_logprobs=None means on-policy (r = 1)."""
    old = logprobs.detach() if old_logprobs is None else old_logprobs
    # Trap: exp of garbage in padded positions can be inf, and inf * 0 in backward is NaN; zero them first.
    return torch.exp(torch.where(mask, logprobs - old, torch.zeros_like(logprobs)))


def _clipped_surrogate(logprobs, advantages, mask, old_logprobs, ref_logprobs, clip_eps, kl_coef, clip_eps_high=None):
    """PPO clip (Schulman et al. 2017) as in GRPO's objective: max(-A r, -A clip(r, 1-eps, 1+eps_high)) +
    beta * k3 KL; eps_high=None is eps (symmetric; DAPO's clip-higher sets it apart)."""
    if kl_coef and ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs")
    zero = torch.zeros_like(logprobs)
    ratio = _ratio(logprobs, old_logprobs, mask)  # [B*G, L]
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + (clip_eps if clip_eps_high is None else clip_eps_high))
    loss_mat = torch.maximum(unclipped, clipped)  # [B*G, L]
    metrics = {"clip_fraction": _masked_mean((clipped > unclipped).float(), mask),
               "ratio_mean": _masked_mean(ratio, mask)}
    if ref_logprobs is not None:
        log_ref_ratio = torch.where(mask, ref_logprobs - logprobs, zero)  # [B*G, L]
        kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1  # k3 estimator of KL(pi || pi_ref), >= 0
        loss_mat = loss_mat + kl_coef * kl
        metrics["kl"] = _masked_mean(kl, mask)
    return loss_mat, metrics


@register_policy_loss("grpo", loss_agg="seq_mean", options=("clip_eps", "kl_coef", "num_iterations"))
def grpo_policy_loss(logprobs, advantages, mask, *, old_logprobs=None, ref_logprobs=None, clip_eps=0.2,
                     kl_coef=0.0, **_):
    """GRPO (DeepSeekMath, Shao et al. 2024): clipped surrogate, optional k3 KL, per-sequence mean."""
    return _clipped_surrogate(logprobs, advantages, mask, old_logprobs, ref_logprobs, clip_eps, kl_coef)


@register_policy_loss("dr_grpo", loss_agg="token_sum_norm", options=("clip_eps",))
def dr_grpo_policy_loss(logprobs, advantages, mask, *, old_logprobs=None, ref_logprobs=None, clip_eps=0.2,
                        kl_coef=0.0, **_):
    """Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): GRPO's clipped surrogate, token sum
    divided by a constant (max_response_length) so long and short answers weigh the same per token."""
    return _clipped_surrogate(logprobs, advantages, mask, old_logprobs, ref_logprobs, clip_eps, kl_coef)


# Reductions with num_iterations=1 and an exactly on-policy rollout (old_logprobs = logprobs.detach(), every
# ratio 1, no clip active): dapo and cispo have GPG's gradient with std-normalised advantages (token_mean),
# gspo has GRPO's (seq_mean, no KL), rloo has G/(G-1) times GPG's. docs/algorithms.md#reductions.


@register_policy_loss("dapo", loss_agg="token_mean", options=("clip_eps", "clip_eps_high", "num_iterations"),
                      defaults={"clip_eps_high": 0.28})
def dapo_policy_loss(logprobs, advantages, mask, *, old_logprobs=None, clip_eps=0.2, clip_eps_high=0.28, **_):
    """DAPO (Yu et al. 2025, arXiv 2503.14476): PPO clip with a higher upper bound ("clip-higher", eps_low 0.2,
    eps_high 0.28), token-level aggregation, no KL. On-policy: ratio 1, per-token gradient -A d log pi."""
    return _clipped_surrogate(logprobs, advantages, mask, old_logprobs, None, clip_eps, 0.0, clip_eps_high)


@register_policy_loss("gspo", loss_agg="seq_mean", options=("clip_eps", "clip_eps_high", "num_iterations"),
                      defaults={"clip_eps": 3e-4, "clip_eps_high": 4e-4})
def gspo_policy_loss(logprobs, advantages, mask, *, old_logprobs=None, clip_eps=3e-4, clip_eps_high=4e-4, **_):
    """GSPO (Zheng et al. 2025, arXiv 2507.18071): one ratio per sequence, s_i = exp(mean_t (log pi - log
    pi_old)), the geometric mean of its token ratios, in max(-A s, -A clip(s, 1-eps, 1+eps_high)); the
    paper's eps are 3e-4 / 4e-4. Returned broadcast over the sequence's tokens, so `seq_mean` (default) is
    the paper's mean over sequences. On-policy: s = 1 and d s / d log pi_t = 1 / |o_i|: GRPO's gradient."""
    log_ratio = torch.where(mask, logprobs - (logprobs.detach() if old_logprobs is None else old_logprobs),
                            torch.zeros_like(logprobs))
    seq_ratio = torch.exp(log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1))  # [B*G, 1]
    unclipped = -advantages * seq_ratio
    clipped = -advantages * seq_ratio.clamp(1 - clip_eps, 1 + clip_eps_high)
    per_seq = torch.maximum(unclipped, clipped)  # [B*G, 1]
    metrics = {"clip_fraction": _masked_mean((clipped > unclipped).float(), mask),
               "ratio_mean": _masked_mean(seq_ratio, mask)}
    return per_seq.expand_as(logprobs), metrics


@register_policy_loss("rloo", loss_agg="token_mean", options=())
def rloo_policy_loss(logprobs, advantages, mask, **_):
    """RLOO's REINFORCE term, per token -A * log pi, on-policy like GPG (its advantage is what differs)."""
    return -advantages * logprobs, {}


@register_policy_loss("cispo", loss_agg="token_mean", options=("clip_eps_high", "num_iterations"),
                      defaults={"clip_eps_high": 5.0})
def cispo_policy_loss(logprobs, advantages, mask, *, old_logprobs=None, clip_eps_high=5.0, **_):
    """CISPO (MiniMax-M1, arXiv 2506.13585): per token -sg(min(r, 1 + eps_high)) * A * log pi. The weight is
    clipped (no lower bound, as the paper sets eps_low large) and detached, so every token keeps a gradient,
    unlike PPO's clip that drops it. Default eps_high 5.0 (ScaleRL's, TRL's recommendation). On-policy: r = 1."""
    weight = _ratio(logprobs, old_logprobs, mask).detach().clamp(max=1 + clip_eps_high)  # [B*G, L]
    metrics = {"clip_fraction": _masked_mean((weight >= 1 + clip_eps_high).float(), mask),
               "ratio_mean": _masked_mean(weight, mask)}
    return -advantages * weight * logprobs, metrics
