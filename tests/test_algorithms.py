"""Hand-computed cases for gpg_vl.algorithms, plus a bandit check that GPG's gradient is the policy gradient."""

import math

import pytest
import torch

from gpg_vl import algorithms

ALGOS = ("gpg", "grpo", "dr_grpo", "dapo", "gspo", "rloo", "cispo")
VALID_NAMES = "cispo, dapo, dr_grpo, gpg, grpo, gspo, rloo"


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual).double(), torch.as_tensor(expected).double(),
                               atol=atol, rtol=0)


# ---------------------------------------------------------------- groups, AGE alpha, beta_th


def test_valid_group_mask_and_fraction_binary_rewards():
    # G=4; groups: [1,0,0,1] mixed, [1,1,1,1] all right, [0,0,0,0] all wrong -> M=2 of B=3
    rewards = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0])
    assert algorithms.valid_group_mask(rewards, group_size=4).tolist() == [True, False, False]
    assert algorithms.valid_group_fraction(rewards, group_size=4) == pytest.approx(1 / 3)  # (3-2)/3
    assert isinstance(algorithms.valid_group_fraction(rewards, group_size=4), float)


def test_valid_group_mask_continuous_rewards_within_tolerance():
    # IoU rewards: group 0 differs by 4e-7 < atol=1e-6 -> zero-variance; group 1 spans 0.2..0.9 -> valid
    rewards = torch.tensor([0.7, 0.7000004, 0.7, 0.7, 0.2, 0.9, 0.5, 0.4])
    assert algorithms.valid_group_mask(rewards, group_size=4).tolist() == [False, True]
    assert algorithms.valid_group_fraction(rewards, group_size=4) == 0.5  # (2-1)/2
    # a coarser tolerance also folds group 1 (range 0.7) into "equal"
    assert algorithms.valid_group_mask(rewards, group_size=4, atol=0.8).tolist() == [False, False]


def test_group_shape_errors():
    with pytest.raises(ValueError):
        algorithms.valid_group_mask(torch.zeros(7), group_size=4)  # 7 is not a multiple of 4
    with pytest.raises(ValueError):
        algorithms.compute_advantages("gpg", torch.zeros(4), group_size=1)  # no baseline in a group of one


def test_age_alpha():
    assert algorithms.age_alpha(1 / 3) == pytest.approx(3.0)  # B/(B-M) = 3/1
    assert algorithms.age_alpha(0.75) == pytest.approx(4 / 3)  # 4/3
    assert algorithms.age_alpha(1.0) == 1.0  # no zero-variance group: no correction
    assert algorithms.age_alpha(0.0) == 0.0  # no valid group: loss forced to exactly 0
    with pytest.raises(ValueError):
        algorithms.age_alpha(1.5)


def test_needs_resampling_below_beta_th():
    assert algorithms.needs_resampling(0.5, beta_th=0.6)  # 0.5 < 0.6: roll out more
    assert not algorithms.needs_resampling(0.6, beta_th=0.6)  # at the threshold: train
    assert not algorithms.needs_resampling(0.0, beta_th=0.0)  # beta_th=0 disables resampling


# ---------------------------------------------------------------- advantages


def test_gpg_advantages_mean_centred():
    # group means: [1,0,0,1] -> 0.5, [1,1,1,1] -> 1, [0,0,0,0] -> 0; A = r - mean, F_norm = 1
    rewards = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0])
    adv = algorithms.compute_advantages("gpg", rewards, group_size=4, std_normalize=False)
    close(adv, [0.5, -0.5, -0.5, 0.5] + [0.0] * 8)
    # gpg's default is F_norm = 1, the same thing
    close(algorithms.compute_advantages("gpg", rewards, group_size=4), adv)


def test_std_normalized_advantages():
    # unbiased std of [1,0,0,1] = sqrt(4 * 0.25 / 3) = 0.57735 -> A = +-0.5 / (0.57735 + 1e-6) = +-0.866025
    rewards = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1])
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    expected = [a, -a, -a, a, 0, 0, 0, 0]  # the all-equal group has std 0 -> exactly 0, not NaN
    close(algorithms.compute_advantages("gpg", rewards, group_size=4, std_normalize=True), expected)
    close(algorithms.compute_advantages("grpo", rewards, group_size=4), expected)  # grpo's default


def test_dr_grpo_advantages_and_std_rejected():
    rewards = torch.tensor([1.0, 0, 0, 0])  # mean 0.25 -> [0.75, -0.25, -0.25, -0.25]
    close(algorithms.compute_advantages("dr_grpo", rewards, group_size=4), [0.75, -0.25, -0.25, -0.25])
    with pytest.raises(ValueError, match="std"):
        algorithms.compute_advantages("dr_grpo", rewards, group_size=4, std_normalize=True)


def test_advantages_continuous_rewards_near_equal_group_is_zero():
    # group 0 (range 4e-7) counts as zero-variance -> 0 even with std normalisation, which would otherwise
    # inflate float noise to about +-0.87; group 1: mean 2.0/4 = 0.5 -> [-0.3, 0.4, 0.0, -0.1]
    rewards = torch.tensor([0.7, 0.7000004, 0.7, 0.7, 0.2, 0.9, 0.5, 0.4], dtype=torch.float64)
    close(algorithms.compute_advantages("gpg", rewards, group_size=4), [0, 0, 0, 0, -0.3, 0.4, 0.0, -0.1])
    std_adv = algorithms.compute_advantages("grpo", rewards, group_size=4)
    assert std_adv[:4].abs().max() == 0


def test_integer_rewards_accepted():
    close(algorithms.compute_advantages("gpg", torch.tensor([1, 0]), group_size=2), [0.5, -0.5])


# ---------------------------------------------------------------- aggregation

# per-token loss with junk (100, NaN) in padded positions; row 0 has 3 tokens, row 1 has 1
LOSS_MAT = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, float("nan")]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])


def test_agg_loss_modes():
    close(algorithms.agg_loss(LOSS_MAT, MASK, "token_mean"), 2.5)  # (1+2+3+4) / 4 tokens
    close(algorithms.agg_loss(LOSS_MAT, MASK, "seq_mean"), 3.0)  # (6/3 + 4/1) / 2 sequences
    close(algorithms.agg_loss(LOSS_MAT, MASK, "token_sum_norm"), 10 / 6)  # 10 / (2 seqs * width 3)
    close(algorithms.agg_loss(LOSS_MAT, MASK, "token_sum_norm", max_response_length=5), 1.0)  # 10 / (2*5)


def test_agg_loss_explicit_totals():
    close(algorithms.agg_loss(LOSS_MAT, MASK, "token_mean", total_tokens=8), 1.25)  # 10 / 8
    close(algorithms.agg_loss(LOSS_MAT, MASK, "seq_mean", total_sequences=4), 1.5)  # (2 + 4) / 4
    close(algorithms.agg_loss(LOSS_MAT, MASK, "token_sum_norm", total_sequences=4), 10 / 12)  # 10/(4*3)


def test_agg_loss_empty_mask_is_zero_not_nan():
    for mode in algorithms.LOSS_AGG_MODES:
        close(algorithms.agg_loss(LOSS_MAT, torch.zeros_like(MASK), mode), 0.0)


# ---------------------------------------------------------------- registries


def test_unknown_names_list_valid_ones():
    with pytest.raises(KeyError, match=VALID_NAMES):
        algorithms.compute_advantages("ppo", torch.zeros(4), group_size=2)
    with pytest.raises(KeyError, match=VALID_NAMES):
        algorithms.compute_policy_loss("ppo", torch.zeros(2, 1), torch.zeros(2), torch.ones(2, 1))
    with pytest.raises(ValueError, match="token_mean, seq_mean, token_sum_norm"):
        algorithms.agg_loss(LOSS_MAT, MASK, "mean")


def test_registries_hold_builtins_and_accept_plugins(restore_algorithms):
    assert algorithms.registered_algorithms() == sorted(ALGOS)
    assert {n: algorithms.ALGORITHMS[n].loss_agg for n in ALGOS} == {
        "gpg": "token_mean", "grpo": "seq_mean", "dr_grpo": "token_sum_norm", "dapo": "token_mean",
        "gspo": "seq_mean", "rloo": "token_mean", "cispo": "token_mean"}

    @algorithms.register_advantage("test_plain")
    def raw_rewards(rewards, *, group_size, std_normalize=False, eps=1e-6, atol=1e-6):
        return rewards

    close(algorithms.compute_advantages("test_plain", torch.tensor([1.0, 2.0]), group_size=2), [1.0, 2.0])
    with pytest.raises(ValueError, match="already registered"):
        algorithms.register_advantage("test_plain")(raw_rewards)


# ---------------------------------------------------------------- policy losses: hand cases

# two completions of one prompt: row 0 has 2 tokens, row 1 has 1 token and a padded -inf
LOGPROBS = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, float("-inf"), float("-inf")]])
PAD_MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
ADV = torch.tensor([0.5, -0.5])


def test_gpg_loss_token_mean_with_alpha_and_padding():
    # per-token -A*logp: row 0: -0.5*-1 = 0.5, -0.5*-2 = 1.0; row 1: 0.5*-0.5 = -0.25
    # token_mean = (0.5 + 1.0 - 0.25) / 3 = 0.416667; alpha 2 -> 0.833333
    logprobs = LOGPROBS.clone().requires_grad_()
    loss, metrics = algorithms.compute_policy_loss("gpg", logprobs, ADV, PAD_MASK, alpha=2.0)
    close(loss, 2 * 1.25 / 3)
    assert metrics == pytest.approx({"policy_loss": 2 * 1.25 / 3, "alpha": 2.0, "adv_abs_mean": 0.5})
    # d loss / d logp = -alpha * A / 3 on trained tokens, 0 on padding (no NaN from the -inf there)
    loss.backward()
    close(logprobs.grad, [[-1 / 3, -1 / 3, 0.0], [1 / 3, 0.0, 0.0]])


def test_gpg_loss_seq_mean_option():
    # per-sequence means: row 0 (0.5 + 1.0)/2 = 0.75, row 1 -0.25 -> (0.75 - 0.25) / 2 = 0.25
    loss, _ = algorithms.compute_policy_loss("gpg", LOGPROBS, ADV, PAD_MASK, loss_agg="seq_mean")
    close(loss, 0.25)


def test_gpg_loss_rejects_kl():
    with pytest.raises(ValueError, match="KL"):
        algorithms.compute_policy_loss("gpg", LOGPROBS, ADV, PAD_MASK, kl_coef=0.1)


def test_all_zero_variance_gives_exact_zero_loss_and_finite_grads():
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0])  # every group all-equal -> M = B
    frac = algorithms.valid_group_fraction(rewards, group_size=2)
    alpha = algorithms.age_alpha(frac)  # 0.0
    for name in ALGOS:
        for std in ([False, True] if "std_normalize" in algorithms.ALGORITHMS[name].options else [None]):
            adv = algorithms.compute_advantages(name, rewards, group_size=2, std_normalize=std)
            assert adv.abs().max() == 0 and torch.isfinite(adv).all()
            logprobs = torch.full((4, 3), -1.0, requires_grad=True)
            loss, metrics = algorithms.compute_policy_loss(name, logprobs, adv, torch.ones(4, 3), alpha=alpha)
            loss.backward()
            assert loss.item() == 0.0 and all(math.isfinite(v) for v in metrics.values())
            assert torch.isfinite(logprobs.grad).all() and logprobs.grad.abs().max() == 0


def test_grpo_clipping_hand_case():
    # old p = 0.5, new p = 0.8 -> ratio 1.6 > 1 + 0.2
    old = torch.log(torch.tensor([[0.5], [0.5]]))
    logprobs = torch.log(torch.tensor([[0.8], [0.8]])).requires_grad_()
    adv = torch.tensor([1.0, -1.0])
    loss, metrics = algorithms.compute_policy_loss("grpo", logprobs, adv, torch.ones(2, 1), old_logprobs=old)
    # A=+1: max(-1.6, -1.2) = -1.2 (clipped, no gradient); A=-1: max(1.6, 1.2) = 1.6 (d/dlogp = ratio = 1.6)
    # seq_mean over 2 sequences: (-1.2 + 1.6) / 2 = 0.2; grads: [0, 1.6 / 2]
    close(loss, 0.2)
    loss.backward()
    close(logprobs.grad, [[0.0], [0.8]])
    assert metrics["clip_fraction"] == pytest.approx(0.5) and metrics["ratio_mean"] == pytest.approx(1.6)
    assert "kl" not in metrics


def test_grpo_k3_kl_hand_case():
    # on-policy (ratio 1): surrogate = -A = -1; p = 0.5, p_ref = 0.25: d = log(0.25/0.5) = -0.693147
    # k3 = e^d - d - 1 = 0.5 + 0.693147 - 1 = 0.193147; loss = -1 + 0.04 * 0.193147 = -0.992274
    logprobs = torch.log(torch.tensor([[0.5]]))
    ref = torch.log(torch.tensor([[0.25]]))
    loss, metrics = algorithms.compute_policy_loss("grpo", logprobs, torch.tensor([1.0]), torch.ones(1, 1),
                                                   ref_logprobs=ref, clip_eps=0.2, kl_coef=0.04)
    k3 = 0.5 + math.log(2) - 1
    close(loss, -1 + 0.04 * k3)
    assert metrics["kl"] == pytest.approx(k3) and metrics["clip_fraction"] == 0.0
    with pytest.raises(ValueError, match="ref_logprobs"):
        algorithms.compute_policy_loss("grpo", logprobs, torch.tensor([1.0]), torch.ones(1, 1), kl_coef=0.04)


def test_dr_grpo_token_sum_over_constant():
    # on-policy: per-token -A = [-0.5, -0.5 | 0.5]; sum = -0.5; / (2 seqs * max_response_length 4) = -0.0625
    loss, metrics = algorithms.compute_policy_loss("dr_grpo", LOGPROBS, ADV, PAD_MASK, max_response_length=4)
    close(loss, -0.0625)
    close(algorithms.compute_policy_loss("dr_grpo", LOGPROBS, ADV, PAD_MASK)[0], -0.5 / 6)  # width 3
    assert set(metrics) == {"policy_loss", "alpha", "adv_abs_mean", "clip_fraction", "ratio_mean"}


def test_shape_mismatch_fails():
    with pytest.raises(ValueError, match="shape"):
        algorithms.compute_policy_loss("gpg", torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 4))


# ---------------------------------------------------------------- micro-batching


@pytest.mark.parametrize("name", ALGOS)
@pytest.mark.parametrize("loss_agg", algorithms.LOSS_AGG_MODES)
def test_micro_batch_losses_sum_to_full_batch(name, loss_agg):
    gen = torch.Generator().manual_seed(0)
    n, width = 8, 5
    lengths = torch.tensor([5, 1, 3, 2, 5, 4, 1, 3])
    mask = (torch.arange(width) < lengths.unsqueeze(-1)).double()  # [8, 5] right-padded
    logprobs = (-torch.rand(n, width, generator=gen, dtype=torch.float64)).requires_grad_()
    old = logprobs.detach() + 0.3 * torch.randn(n, width, generator=gen, dtype=torch.float64)  # some clipping
    ref = logprobs.detach() - 0.1
    adv = torch.randn(n, generator=gen, dtype=torch.float64)
    opts = dict(old_logprobs=old, loss_agg=loss_agg, alpha=1.5, max_response_length=7)
    if name in ("grpo", "dr_grpo"):
        opts.update(ref_logprobs=ref, kl_coef=0.04)
    if name != "gpg":
        opts.update(clip_eps=0.2, clip_eps_high=0.3)
    full, _ = algorithms.compute_policy_loss(name, logprobs, adv, mask, **opts)
    (full_grad,) = torch.autograd.grad(full, logprobs)
    totals = dict(total_tokens=mask.sum(), total_sequences=n)
    summed = 0.0
    for rows in (slice(0, 3), slice(3, 6), slice(6, 8)):
        sub = {k: (v[rows] if torch.is_tensor(v) else v) for k, v in opts.items()}
        part, _ = algorithms.compute_policy_loss(name, logprobs[rows], adv[rows], mask[rows], **sub, **totals)
        summed = summed + part
    (summed_grad,) = torch.autograd.grad(summed, logprobs)
    close(summed, full, atol=1e-12)
    close(summed_grad, full_grad, atol=1e-12)


# ---------------------------------------------------------------- statistics on a bandit

ARM_REWARDS = torch.tensor([1.0, 0.0, 0.3, 0.6], dtype=torch.float64)
LOGITS = torch.tensor([0.5, -0.3, 0.1, 0.0], dtype=torch.float64)


def bandit_gpg_gradient(group_size, num_groups, advantages_of=None, seed=0):
    """Ascent direction -d(GPG loss)/d(logits), one token per completion, averaged over sampled groups."""
    gen = torch.Generator().manual_seed(seed)
    actions = torch.multinomial(LOGITS.softmax(0), num_groups * group_size, replacement=True, generator=gen)
    rewards = ARM_REWARDS[actions]  # [B*G]
    logits = LOGITS.clone().requires_grad_()
    logprobs = torch.log_softmax(logits, 0)[actions].unsqueeze(-1)  # [B*G, 1]
    adv = algorithms.compute_advantages("gpg", rewards, group_size=group_size, std_normalize=False)
    adv = adv if advantages_of is None else advantages_of(rewards, adv)
    loss, _ = algorithms.compute_policy_loss("gpg", logprobs, adv, torch.ones_like(logprobs), alpha=1.0)
    (grad,) = torch.autograd.grad(loss, logits)
    return -grad


def test_gpg_gradient_matches_scaled_true_policy_gradient():
    # J = sum_a pi_a r_a, so dJ/dlogit_k = pi_k (r_k - J) = [0.1562, -0.0946, -0.0674, 0.0058].
    # The group mean includes the sample itself: E[(r_i - mean) grad log pi(a_i)] = (G-1)/G dJ.
    # Tolerance: 2e-3 per coordinate, about 6 standard errors (SE ~3e-4 with 50,000 groups of 4), fixed seed.
    # The nearest wrong answers are far outside it: dJ itself (no (G-1)/G, e.g. a leave-one-out or a missing
    # baseline) is off by 0.039 in coordinate 0, a flipped sign by 0.23; both are checked below to fail.
    G, tol = 4, 2e-3
    pi = LOGITS.softmax(0)
    true_grad = pi * (ARM_REWARDS - (pi * ARM_REWARDS).sum())
    expected = (G - 1) / G * true_grad

    def within_tol(estimate):
        return (estimate - expected).abs().max().item() <= tol

    assert within_tol(bandit_gpg_gradient(G, 50_000))
    assert not within_tol(bandit_gpg_gradient(G, 50_000, advantages_of=lambda r, a: r))  # missing baseline
    assert not within_tol(bandit_gpg_gradient(G, 50_000, advantages_of=lambda r, a: -a))  # wrong sign
    assert not within_tol(true_grad)  # the test tells (G-1)/G dJ from dJ


def test_grpo_gradient_equals_plain_policy_gradient_on_policy():
    # old = current (detached): ratio = 1, never clipped, and d(-A * exp(logp - old))/dlogp = -A, which is
    # exactly the gradient of the plain policy-gradient loss -A * logp; both aggregated as seq_mean.
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 5, (6, 3), generator=gen)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]] * 2, dtype=torch.float64)
    adv = torch.randn(6, generator=gen, dtype=torch.float64)

    def logprobs():
        return torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [6, 3]

    lp = logprobs()
    grpo, metrics = algorithms.compute_policy_loss("grpo", lp, adv, mask, old_logprobs=lp.detach(), clip_eps=0.2)
    (grpo_grad,) = torch.autograd.grad(grpo, logits)
    plain, _ = algorithms.compute_policy_loss("gpg", logprobs(), adv, mask, loss_agg="seq_mean")
    (plain_grad,) = torch.autograd.grad(plain, logits)
    close(grpo_grad, plain_grad, atol=1e-12)
    assert metrics["clip_fraction"] == 0.0 and metrics["ratio_mean"] == pytest.approx(1.0)
    # old_logprobs=None means the same on-policy ratio
    again, _ = algorithms.compute_policy_loss("grpo", logprobs(), adv, mask)
    close(torch.autograd.grad(again, logits)[0], plain_grad, atol=1e-12)


def test_registrations_carry_the_facts_the_config_reads():
    assert algorithms.registered_algorithms() == VALID_NAMES.split(", ")
    gpg, grpo, dr = (algorithms.algorithm_spec(n) for n in ("gpg", "grpo", "dr_grpo"))
    assert (gpg.std_normalize, gpg.loss_agg, gpg.options) == (False, "token_mean", ("std_normalize",))
    assert (grpo.std_normalize, grpo.loss_agg) == (True, "seq_mean")
    assert grpo.options == ("std_normalize", "clip_eps", "kl_coef", "num_iterations")
    assert (dr.std_normalize, dr.loss_agg, dr.options) == (False, "token_sum_norm", ("clip_eps",))
    # compute_advantages(std_normalize=None) takes the registered default: grpo divides by the std
    rewards = torch.tensor([1.0, 0, 0, 1])
    close(algorithms.compute_advantages("grpo", rewards, group_size=4),
          algorithms.compute_advantages("grpo", rewards, group_size=4, std_normalize=True))


def test_algorithm_spec_errors_name_the_valid_algorithms_or_the_missing_half(restore_algorithms):
    with pytest.raises(KeyError, match=f"unknown algorithm 'ppo'; valid names: {VALID_NAMES}"):
        algorithms.algorithm_spec("ppo")
    algorithms.register_advantage("half")(algorithms.compute_gpg_advantages)
    assert "half" not in algorithms.registered_algorithms()  # an estimator alone is not an algorithm
    with pytest.raises(KeyError, match="has no policy loss; register one with @algorithms.register_policy_loss"):
        algorithms.algorithm_spec("half")


def test_registration_rejects_unknown_options():
    with pytest.raises(ValueError, match="unknown options \\['beta'\\]; valid: clip_eps, clip_eps_high, kl_coef, num_iterations"):
        algorithms.register_policy_loss("x", options=("beta",))
    with pytest.raises(ValueError, match="unknown options"):
        algorithms.register_advantage("x", options=("clip_eps",))  # clip_eps belongs to the loss
    with pytest.raises(ValueError, match="unknown options \\['beta'\\]; valid: clip_eps, clip_eps_high"):
        algorithms.register_policy_loss("x", defaults={"beta": 1.0})
    assert "x" not in algorithms.ALGORITHMS


# ---------------------------------------------------------------- dapo, gspo, rloo, cispo: hand cases


def test_dapo_clip_higher_hand_case():
    # old p = 0.5 in every row; new p: 0.7 (ratio 1.4), 0.625 (ratio 1.25), 0.3 (ratio 0.6); A = +1, +1, -1
    # row 0: max(-1.4, -1.28) = -1.28 clipped (no grad); row 1: 1.25 < 1 + 0.28 -> -1.25, d/dlogp = -1.25
    # row 2: A<0, max(0.6, 0.8) = 0.8 clipped at 1 - 0.2 (no grad); token_mean: (-1.28 - 1.25 + 0.8) / 3
    old = torch.log(torch.tensor([[0.5], [0.5], [0.5]], dtype=torch.float64))
    logprobs = torch.log(torch.tensor([[0.7], [0.625], [0.3]], dtype=torch.float64)).requires_grad_()
    adv = torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
    loss, metrics = algorithms.compute_policy_loss("dapo", logprobs, adv, torch.ones(3, 1), old_logprobs=old,
                                                   clip_eps=0.2, clip_eps_high=0.28)
    close(loss, -1.73 / 3)
    loss.backward()
    close(logprobs.grad, [[0.0], [-1.25 / 3], [0.0]])
    assert metrics["clip_fraction"] == pytest.approx(2 / 3)
    # symmetric clip (GRPO's 0.2) would clip row 1 too: its gradient is what clip-higher keeps
    logprobs.grad = None
    sym, _ = algorithms.compute_policy_loss("dapo", logprobs, adv, torch.ones(3, 1), old_logprobs=old, clip_eps=0.2,
                                            clip_eps_high=0.2)
    sym.backward()
    close(logprobs.grad, [[0.0], [0.0], [0.0]])


def test_gspo_sequence_ratio_hand_case():
    # seq 0: token deltas 0.1, 0.3 -> s = exp(mean 0.2) = 1.2214 > 1 + 4e-4, A = +1 -> -1.0004 clipped (no grad)
    # seq 1: deltas 1e-4, 3e-4 -> s = exp(2e-4) inside (1 - 3e-4, 1 + 4e-4), A = -0.5 -> 0.5 s
    # seq_mean over 2 sequences: (-1.0004 + 0.5 s) / 2; d/dlogp_t (seq 1) = 0.5 * s / |o| / 2 = s / 8
    old = torch.tensor([[-1.0, -2.0], [-1.0, -2.0]], dtype=torch.float64)
    logprobs = (old + torch.tensor([[0.1, 0.3], [1e-4, 3e-4]], dtype=torch.float64)).requires_grad_()
    adv = torch.tensor([1.0, -0.5], dtype=torch.float64)
    loss, metrics = algorithms.compute_policy_loss("gspo", logprobs, adv, torch.ones(2, 2), old_logprobs=old,
                                                   clip_eps=3e-4, clip_eps_high=4e-4)
    s = math.exp(2e-4)
    close(loss, (-1.0004 + 0.5 * s) / 2, atol=1e-7)  # close() reads python floats as float32
    loss.backward()
    close(logprobs.grad, [[0.0, 0.0], [s / 8, s / 8]], atol=1e-7)
    assert metrics["clip_fraction"] == pytest.approx(0.5)  # seq 0's two tokens of 4
    assert metrics["ratio_mean"] == pytest.approx((math.exp(0.2) + s) / 2)


def test_rloo_leave_one_out_advantages():
    # G=4, rewards [1,0,0,0]: r_0 - mean(0,0,0) = 1; r_1 - mean(1,0,0) = -1/3 (= 4/3 * (r - 0.25));
    # group 2 [1,1,0,1]: r_2' - mean(1,1,1) = -1, the others 1 - 2/3 = 1/3; an all-equal group gives 0
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 1, 1, 1, 1, 1])
    expected = [1, -1 / 3, -1 / 3, -1 / 3, 1 / 3, 1 / 3, -1, 1 / 3, 0, 0, 0, 0]
    close(algorithms.compute_advantages("rloo", rewards, group_size=4), expected)
    # its loss is GPG's: -A * log pi, token_mean: (-1 * -1 + 1/3 * -0.5 ... ) checked on one row: -1 * log 0.5
    loss, _ = algorithms.compute_policy_loss("rloo", torch.log(torch.tensor([[0.5]])), torch.tensor([1.0]), torch.ones(1, 1))
    close(loss, math.log(2))


def test_cispo_clipped_detached_weight_hand_case():
    # row 0: A=+1, ratio 0.8/0.5 = 1.6 -> weight min(1.6, 1 + 0.2) = 1.2: loss -1.2 * log 0.8, d/dlogp = -1.2
    #        (PPO's clip would give this token no gradient at all)
    # row 1: A=-1, ratio 0.3/0.5 = 0.6, no lower bound -> weight 0.6: loss 0.6 * log 0.3, d/dlogp = +0.6
    # token_mean over 2 tokens: (-1.2 log 0.8 + 0.6 log 0.3) / 2 = (0.267772 - 0.722384) / 2 = -0.227306
    old = torch.log(torch.tensor([[0.5], [0.5]], dtype=torch.float64))
    logprobs = torch.log(torch.tensor([[0.8], [0.3]], dtype=torch.float64)).requires_grad_()
    loss, metrics = algorithms.compute_policy_loss("cispo", logprobs, torch.tensor([1.0, -1.0], dtype=torch.float64),
                                                   torch.ones(2, 1), old_logprobs=old, clip_eps_high=0.2)
    close(loss, (-1.2 * math.log(0.8) + 0.6 * math.log(0.3)) / 2, atol=1e-7)
    loss.backward()
    close(logprobs.grad, [[-0.6], [0.3]], atol=1e-7)
    assert metrics["clip_fraction"] == 0.5 and metrics["ratio_mean"] == pytest.approx(0.9)


# ---------------------------------------------------------------- reductions: num_iterations=1, on-policy


def _onpolicy_grad(name, rewards, **opts):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(8, 4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 6, (8, 4), generator=gen)
    mask = (torch.arange(4) < torch.tensor([4, 1, 3, 2, 4, 2, 1, 3]).unsqueeze(-1)).double()
    lp = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [8, 4]
    adv = algorithms.compute_advantages(name, rewards, group_size=4, std_normalize=opts.pop("std_normalize", None))
    loss, metrics = algorithms.compute_policy_loss(name, lp, adv, mask, old_logprobs=lp.detach(), **opts)
    return torch.autograd.grad(loss, logits)[0], metrics


def test_on_policy_reductions_to_gpg_and_grpo():
    # With old = current (num_iterations=1, exact on-policy rollout) every ratio is 1 and no clip is active:
    # dapo and cispo have exactly GPG's gradient with std-normalised advantages (both token_mean);
    # gspo has GRPO's (both seq_mean, s_i = 1, d s_i = mean_t d log pi); rloo has G/(G-1) = 4/3 times GPG's.
    rewards = torch.tensor([1.0, 0, 0, 1, 0.2, 0.9, 0.5, 0.4], dtype=torch.float64)
    gpg_std, _ = _onpolicy_grad("gpg", rewards, std_normalize=True)
    gpg_plain, _ = _onpolicy_grad("gpg", rewards)
    grpo, _ = _onpolicy_grad("grpo", rewards, clip_eps=0.2)
    for name, opts, expected in (("dapo", dict(clip_eps=0.2, clip_eps_high=0.28), gpg_std),
                                 ("cispo", dict(clip_eps_high=5.0), gpg_std),
                                 ("gspo", dict(clip_eps=3e-4, clip_eps_high=4e-4), grpo),
                                 ("rloo", {}, gpg_plain * 4 / 3)):
        grad, metrics = _onpolicy_grad(name, rewards, **opts)
        close(grad, expected, atol=1e-12)
        assert metrics.get("clip_fraction", 0.0) == 0.0
    assert not torch.allclose(gpg_std, grpo)  # the two families differ (token_mean vs seq_mean): the test can fail


# ---------------------------------------------------------------- alphas, overlong penalty, TIS, mismatch


def test_paper_alpha_and_verl_alpha_on_one_batch():
    # G=4, B=3: [1,0,0,1] mixed, [1,1,1,1] all right, [0,0,0,0] all wrong
    # paper (AGE): B / (B - M) = 3 / 1 = 3; verl's gpg: samples / nonzero-reward samples = 12 / 6 = 2
    rewards = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0])
    assert algorithms.age_alpha(algorithms.valid_group_fraction(rewards, group_size=4)) == pytest.approx(3.0)
    assert algorithms.verl_gpg_alpha(rewards) == pytest.approx(2.0)
    # no zero-variance group at all: the paper's alpha is 1, verl's still 8 / 4 = 2
    mixed = torch.tensor([1.0, 0, 0, 1, 0, 1, 1, 0])
    assert algorithms.age_alpha(algorithms.valid_group_fraction(mixed, group_size=4)) == 1.0
    assert algorithms.verl_gpg_alpha(mixed) == pytest.approx(2.0)


def test_dapo_overlong_penalty():
    # L_max = 10, L_cache = 4: free up to 6 tokens, then (6 - len) / 4, -1 past 10
    assert [algorithms.overlong_penalty(n, 10, 4) for n in (3, 6, 8, 10, 11)] == [0.0, 0.0, -0.5, -1.0, -1.0]
    with pytest.raises(ValueError, match="buffer"):
        algorithms.overlong_penalty(5, 10, 11)


def test_tis_weights_truncate_the_engine_to_trainer_ratio():
    # trainer log p [-1, -2], engine [-1.5, -1]: ratios e^0.5 = 1.6487 -> cap 1.5, e^-1 = 0.367879
    # gpg with A = 1: per-token -log p = [1, 2] -> weighted [1.5, 0.735759]; token_mean = 2.235759 / 2
    logprobs = torch.tensor([[-1.0, -2.0, 0.0]], requires_grad=True)
    rollout = torch.tensor([[-1.5, -1.0, 7.0]])  # junk on the padded position is ignored
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, metrics = algorithms.compute_policy_loss("gpg", logprobs, torch.tensor([1.0]), mask, rollout_logprobs=rollout,
                                                   rollout_correction="tis", tis_cap=1.5)
    close(loss, (1.5 + 2 * math.exp(-1.0)) / 2)
    assert metrics["tis_capped_fraction"] == 0.5
    assert metrics["tis_weight_mean"] == pytest.approx((1.5 + math.exp(-1.0)) / 2)
    loss.backward()
    close(logprobs.grad, [[-0.75, -math.exp(-1.0) / 2, 0.0]])  # the weight is a constant, not differentiated
    plain, _ = algorithms.compute_policy_loss("gpg", logprobs, torch.tensor([1.0]), mask, rollout_logprobs=rollout)
    close(plain, 1.5)  # rollout_correction="none": weight 1
    with pytest.raises(ValueError, match="rollout_logprobs"):
        algorithms.compute_policy_loss("gpg", logprobs, torch.tensor([1.0]), mask, rollout_correction="tis")


def test_mismatch_stats_over_completion_tokens():
    # |(-1) - (-1.5)| = 0.5, |(-2) - (-1)| = 1.0; the padded position (delta 7) is left out
    total, top, count = algorithms.mismatch_stats(torch.tensor([[-1.0, -2.0, 0.0]]), torch.tensor([[-1.5, -1.0, 7.0]]),
                                                  torch.tensor([[1.0, 1.0, 0.0]]))
    assert (total, top, count) == (pytest.approx(1.5), pytest.approx(1.0), 2)
