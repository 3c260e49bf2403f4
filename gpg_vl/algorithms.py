"""Group advantages and policy losses for GPG (Chu et al., arXiv 2504.02546) and its baselines GRPO and Dr.GRPO.

Estimators and losses are plain functions in two registries keyed by the names used in YAML, CLI and logs
("gpg", "grpo", "dr_grpo"); the trainer calls every one the same way through `compute_advantages` and
`compute_policy_loss`. Layout: B prompts x G completions, group-contiguous (prompt 0's G completions first).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

ADVANTAGE_ESTIMATORS: dict[str, Callable] = {}
POLICY_LOSSES: dict[str, Callable] = {}
# Facts the config reads from the registries (never from a hard-coded list of names): per algorithm its
# default aggregation, its default std normalisation, and which tunable options it accepts.
DEFAULT_LOSS_AGG: dict[str, str] = {}
DEFAULT_STD_NORMALIZE: dict[str, bool] = {}
ADVANTAGE_OPTIONS: dict[str, tuple[str, ...]] = {}
LOSS_OPTIONS: dict[str, tuple[str, ...]] = {}
LOSS_AGG_MODES = ("token_mean", "seq_mean", "token_sum_norm")
#: `algorithm.*` config fields that only some algorithms use; each registration says which ones it takes.
TUNABLE_OPTIONS = ("std_normalize", "clip_eps", "kl_coef", "num_iterations")


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
        if name in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        ADVANTAGE_ESTIMATORS[name], DEFAULT_STD_NORMALIZE[name], ADVANTAGE_OPTIONS[name] = fn, std_normalize, options
        return fn

    return decorate


def register_policy_loss(name: str, loss_agg: str = "token_mean", options=()):
    """Decorator: `fn(logprobs, advantages, mask, *, old_logprobs, ref_logprobs, clip_eps, kl_coef)`
    -> (per-token loss [B*G, L], metrics). `compute_policy_loss` aggregates it (`loss_agg` is the default mode).

    The trainer passes every keyword to every loss (take `**_` for those you ignore); `options` names the
    ones among clip_eps, kl_coef, num_iterations the loss really uses, so the config rejects the others
    instead of silently ignoring them, and loads a reference model exactly when kl_coef > 0."""
    if loss_agg not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss_agg {loss_agg!r}; valid: {', '.join(LOSS_AGG_MODES)}")
    options = _check_options(name, options, TUNABLE_OPTIONS[1:])

    def decorate(fn):
        if name in POLICY_LOSSES:
            raise ValueError(f"policy loss {name!r} is already registered")
        POLICY_LOSSES[name], DEFAULT_LOSS_AGG[name], LOSS_OPTIONS[name] = fn, loss_agg, options
        return fn

    return decorate


@dataclass(frozen=True)
class AlgorithmFacts:
    """What the config needs to know about a registered algorithm (an estimator and a loss of one name)."""

    name: str
    std_normalize: bool  # default F_norm: divide advantages by the group std
    loss_agg: str  # default aggregation mode
    options: tuple[str, ...]  # which of TUNABLE_OPTIONS it accepts


def available_algorithms() -> list[str]:
    """Names registered as both an advantage estimator and a policy loss, sorted."""
    return sorted(set(ADVANTAGE_ESTIMATORS) & set(POLICY_LOSSES))


def algorithm_facts(name: str) -> AlgorithmFacts:
    """The registries' facts about `name`; KeyError naming the valid algorithms (or the missing half)."""
    if name not in ADVANTAGE_ESTIMATORS and name not in POLICY_LOSSES:
        raise KeyError(f"unknown algorithm {name!r}; valid names: {', '.join(available_algorithms())}")
    for registry, kind, decorator in ((ADVANTAGE_ESTIMATORS, "advantage estimator", "register_advantage"),
                                      (POLICY_LOSSES, "policy loss", "register_policy_loss")):
        if name not in registry:
            raise KeyError(f"algorithm {name!r} has no {kind}; register one with @algorithms.{decorator}({name!r})")
    options = tuple(o for o in TUNABLE_OPTIONS if o in ADVANTAGE_OPTIONS[name] + LOSS_OPTIONS[name])
    return AlgorithmFacts(name, DEFAULT_STD_NORMALIZE[name], DEFAULT_LOSS_AGG[name], options)


def _lookup(registry: dict[str, Callable], name: str, kind: str) -> Callable:
    if name not in registry:
        raise KeyError(f"unknown {kind} {name!r}; valid names: {', '.join(sorted(registry))}")
    return registry[name]


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
    estimator = _lookup(ADVANTAGE_ESTIMATORS, name, "advantage estimator")
    std_normalize = DEFAULT_STD_NORMALIZE[name] if std_normalize is None else std_normalize
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
    alpha: float = 1.0, valid_fraction: float | None = None, loss_agg: str | None = None,
    total_tokens=None, total_sequences=None, max_response_length: int | None = None, **loss_options,
) -> tuple[torch.Tensor, dict[str, float]]:
    """loss = alpha * agg(per-token loss of `name`), plus python-float metrics for logging.

    logprobs, response_mask (and old_logprobs, ref_logprobs in `loss_options`): [B*G, L];
    advantages: [B*G] (one per completion, broadcast over its tokens) or [B*G, L].
    loss_agg=None takes the algorithm's default (gpg: token_mean, grpo: seq_mean, dr_grpo: token_sum_norm)."""
    loss_fn = _lookup(POLICY_LOSSES, name, "policy loss")
    if logprobs.shape != response_mask.shape or advantages.shape[0] != logprobs.shape[0]:
        raise ValueError(f"shape mismatch: logprobs {tuple(logprobs.shape)}, response_mask "
                         f"{tuple(response_mask.shape)}, advantages {tuple(advantages.shape)}")
    mask = response_mask.bool()  # [B*G, L]
    advantages = advantages.detach()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)  # [B*G, 1]
    loss_mat, metrics = loss_fn(logprobs, advantages, mask, **loss_options)  # [B*G, L]
    mode = DEFAULT_LOSS_AGG[name] if loss_agg is None else loss_agg
    agg = agg_loss(loss_mat, mask, mode, total_tokens=total_tokens, total_sequences=total_sequences,
                   max_response_length=max_response_length)
    # alpha = 0 (no valid group) gives an exact, finite 0 since the aggregated loss is finite.
    loss = alpha * agg
    metrics.update(policy_loss=float(loss.detach()), alpha=float(alpha),
                   adv_abs_mean=_masked_mean(advantages.abs(), mask))
    if valid_fraction is not None:
        metrics["valid_fraction"] = float(valid_fraction)
    return loss, metrics


@register_policy_loss("gpg", loss_agg="token_mean")
def gpg_policy_loss(logprobs, advantages, mask, *, old_logprobs=None, ref_logprobs=None, clip_eps=0.2,
                    kl_coef=0.0):
    """GPG (arXiv 2504.02546): the plain policy-gradient surrogate, per token -A_i * log pi(o_i,t | q, o_i,<t).

    No ratio, no clip, no KL, no reference: GPG optimises the original objective with one gradient step per
    rollout, so old_logprobs / clip_eps / ref_logprobs are accepted for a uniform call and ignored."""
    if kl_coef:
        raise ValueError("gpg has no KL term; set kl_coef=0 (use grpo for a KL-regularised loss)")
    return -advantages * logprobs, {}  # [B*G, L]


def _clipped_surrogate(logprobs, advantages, mask, old_logprobs, ref_logprobs, clip_eps, kl_coef):
    """PPO clip (Schulman et al. 2017) as in GRPO's objective: max(-A r, -A clip(r, 1-eps, 1+eps)) + beta * k3 KL.

    r = exp(logprobs - old_logprobs); old_logprobs=None means on-policy (old = logprobs.detach(), r = 1)."""
    if kl_coef and ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs")
    old = logprobs.detach() if old_logprobs is None else old_logprobs
    zero = torch.zeros_like(logprobs)
    # Trap: exp of garbage in padded positions can be inf, and inf * 0 in backward is NaN; zero them first.
    ratio = torch.exp(torch.where(mask, logprobs - old, zero))  # [B*G, L]
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)
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
                     kl_coef=0.0):
    """GRPO (DeepSeekMath, Shao et al. 2024): clipped surrogate, optional k3 KL, per-sequence mean."""
    return _clipped_surrogate(logprobs, advantages, mask, old_logprobs, ref_logprobs, clip_eps, kl_coef)


@register_policy_loss("dr_grpo", loss_agg="token_sum_norm", options=("clip_eps",))
def dr_grpo_policy_loss(logprobs, advantages, mask, *, old_logprobs=None, ref_logprobs=None, clip_eps=0.2,
                        kl_coef=0.0):
    """Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): GRPO's clipped surrogate, token sum
    divided by a constant (max_response_length) so long and short answers weigh the same per token."""
    return _clipped_surrogate(logprobs, advantages, mask, old_logprobs, ref_logprobs, clip_eps, kl_coef)
