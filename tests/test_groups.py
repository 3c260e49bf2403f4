"""groups.collect_groups with a scripted engine and task: beta_th resampling through
algorithms.needs_resampling, per-round seeds, valid-first filling, and `algorithm.valid_on`."""

import pytest
import torch

from gpg_vl import RewardOutput, Task, algorithms
from gpg_vl.config import AlgorithmConfig, ConfigError
from gpg_vl.groups import PromptSampler, collect_groups
from gpg_vl.rollout import Rollout, SamplingParams

G = 4


class FormatAccuracyTask(Task):
    """Completions are written "F<format>A<accuracy>", e.g. "F1A0"; total = format + accuracy."""

    name = "format_accuracy"

    def messages(self, example):
        return [{"role": "user", "content": [{"type": "text", "text": example["q"]}]}]

    def score(self, completion, example):
        fmt, acc = float(completion[1]), float(completion[3])
        return RewardOutput(fmt + acc, {"format": fmt, "accuracy": acc})


class ScriptedEngine:
    """Answers prompt q with script[q] (its G completions); records the sampling params of every call."""

    def __init__(self, script: dict[str, list[str]]):
        self.script, self.calls = script, []

    def generate(self, prompts, params: SamplingParams) -> Rollout:
        self.calls.append(params)
        texts = [t for p in prompts for t in self.script[p[0]["content"][0]["text"]]]
        n = len(texts)
        return Rollout(
            prompt_indices=[i // params.n for i in range(n)],
            completion_ids=torch.ones(n, 2, dtype=torch.long),
            response_mask=torch.ones(n, 2),
            logprobs=torch.zeros(n, 2),
            texts=texts,
            finish_reasons=["stop"] * n,
        )


# q0: format varies, accuracy all 0 (valid on the total, not on accuracy)
# q1: accuracy varies (valid on both)
# q2: everything equal (never valid)
SCRIPT = {"q0": ["F1A0", "F0A0", "F1A0", "F0A0"], "q1": ["F1A1", "F1A0", "F1A0", "F1A0"], "q2": ["F1A1"] * 4}
EXAMPLES = [{"q": q} for q in SCRIPT]


def collect(algo: AlgorithmConfig, examples=EXAMPLES, prompts_per_step=3, seed=100):
    engine = ScriptedEngine(SCRIPT)
    groups = collect_groups(
        FormatAccuracyTask(), engine, examples, PromptSampler(len(examples), seed=0), algo,
        SamplingParams(n=G, seed=seed), prompts_per_step=prompts_per_step, pad_id=0,
    )
    return groups, engine


def by_prompt(groups) -> dict[str, bool]:
    return {e["q"]: bool(v) for e, v in zip(groups.examples, groups.valid)}


def test_valid_on_total_counts_format_only_groups_as_valid():
    # 2 of 3 groups valid on the total (q0, q1): 2/3 >= 0.6, so no resampling
    groups, engine = collect(AlgorithmConfig(min_valid_fraction=0.6))
    assert by_prompt(groups) == {"q0": True, "q1": True, "q2": False}
    assert groups.resample_attempts == 0 and len(engine.calls) == 1
    assert (groups.global_valid, groups.global_groups) == (2, 3)


def test_valid_on_a_component_judges_validity_on_it_but_rewards_stay_total():
    # on accuracy only q1 is valid; beta_th compares the valid groups in the pool with B = 3:
    # round 1: 1/3 < 1, round 2: 2/3 < 1, round 3: 3/3 -> stop (each round draws the same 3 prompts)
    groups, engine = collect(AlgorithmConfig(min_valid_fraction=1.0, max_resample_attempts=5, valid_on="accuracy"))
    assert groups.resample_attempts == 2 and len(engine.calls) == 3
    # pool: 9 groups, 3 of them q1 (valid); kept valid-first up to B = 3 -> the three q1 groups
    assert [e["q"] for e in groups.examples] == ["q1", "q1", "q1"] and groups.valid.tolist() == [True] * 3
    assert groups.pool_valid_fraction == pytest.approx(3 / 9)
    # rewards (what advantages are computed from) are still the totals: F1A1 -> 2, F1A0 -> 1
    assert groups.rewards[:G].tolist() == [2.0, 1.0, 1.0, 1.0]
    assert groups.components[0] == {"format": 1.0, "accuracy": 1.0}


def test_valid_on_format_sees_q0_only():
    groups, _ = collect(AlgorithmConfig(min_valid_fraction=0.0, valid_on="format"))
    assert by_prompt(groups) == {"q0": True, "q1": False, "q2": False}
    assert groups.global_valid == 1  # AGE's alpha would be B / (B - M) = 3 / 1


def test_missing_component_fails_in_one_line_naming_what_the_task_reports():
    with pytest.raises(ConfigError) as info:
        collect(AlgorithmConfig(valid_on="correctness"))
    message = str(info.value)
    assert "\n" not in message and info.value.key == "algorithm.valid_on"
    assert "'correctness'" in message and "it reports: total, accuracy, format" in message


def test_extra_rounds_use_their_own_seeds():
    # only q2 (never valid): every allowed extra round is taken
    _, engine = collect(AlgorithmConfig(min_valid_fraction=1.0, max_resample_attempts=2), [{"q": "q2"}], 1, seed=100)
    assert [p.seed for p in engine.calls] == [100, 107, 114]  # seed + 7 * round, as before the refactor
    assert all(p.n == G for p in engine.calls)


def test_the_threshold_rule_is_algorithms_needs_resampling(monkeypatch):
    # collect_groups must defer to the one definition of beta_th: replacing it changes the decision
    seen = []

    def never(valid_fraction, beta_th):
        seen.append((valid_fraction, beta_th))
        return False

    monkeypatch.setattr(algorithms, "needs_resampling", never)
    groups, engine = collect(AlgorithmConfig(min_valid_fraction=1.0, max_resample_attempts=3))
    assert len(engine.calls) == 1 and groups.resample_attempts == 0
    assert seen == [(pytest.approx(2 / 3), 1.0)]  # valid groups over B, and beta_th


def test_max_resample_attempts_zero_never_resamples():
    groups, engine = collect(AlgorithmConfig(min_valid_fraction=1.0, max_resample_attempts=0), [{"q": "q2"}], 1)
    assert len(engine.calls) == 1 and groups.resample_attempts == 0 and groups.global_valid == 0
