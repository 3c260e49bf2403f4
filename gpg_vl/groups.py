"""Collecting a step's groups: roll out, score, and resample below the valid-group threshold (GPG's beta_th).

A group whose G rewards are all equal has zero advantage and gives no gradient. When the share of valid
(non-equal) groups is below `min_valid_fraction`, more prompts are drawn and rolled out, up to
`max_resample_attempts` extra rounds; then the batch is filled valid-first to its configured size. "Equal"
is judged on `algorithm.valid_on` (the total reward, or one named component). All counts are summed over
processes, so every rank takes the same decisions.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from gpg_vl import algorithms
from gpg_vl.config import AlgorithmConfig, ConfigError
from gpg_vl.rollout.base import Rollout, RolloutEngine, SamplingParams
from gpg_vl.task import NonFiniteReward, Task


class PromptSampler:
    """Endless shuffled passes over `num_examples`; each draw of `count` prompts is split across ranks.

    Its state (epoch, cursor) is saved in checkpoints, so a resumed run sees the same prompts.
    """

    def __init__(self, num_examples: int, seed: int, rank: int = 0, world_size: int = 1):
        if num_examples < 1:
            raise ValueError("the training split is empty")
        self.num_examples, self.seed, self.rank, self.world_size = num_examples, seed, rank, world_size
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.num_examples, generator=g).tolist()

    def draw(self, count: int) -> list[int]:
        """`count` prompts from the global stream; this rank's share (count / world_size of them)."""
        out = []
        for _ in range(count):
            if self.cursor == self.num_examples:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation()
            out.append(self._order[self.cursor])
            self.cursor += 1
        return out[self.rank :: self.world_size]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._permutation()


@dataclass
class StepGroups:
    """The groups this rank trains on in one step (B_local groups of G, group-contiguous)."""

    examples: list[dict]  # [B_local]
    prompts: list[list[dict]]  # [B_local] chat messages
    rollout: Rollout  # [B_local*G]
    rewards: torch.Tensor  # [B_local*G]
    components: list[dict[str, float]]  # [B_local*G] named reward parts
    valid: torch.Tensor  # [B_local] bool: the valid_on values (total or a component) not all equal
    resample_attempts: int  # extra rollout rounds this step took
    global_valid: int  # valid groups in the trained batch, all ranks
    global_groups: int  # B, all ranks
    pool_valid_fraction: float  # share of valid groups among everything rolled out, all ranks
    nonfinite_rewards: int = 0  # NaN/inf rewards anywhere in the pool, all ranks (the guard stops or skips)


def _sum_locally(values: list[int]) -> list[int]:
    return values


def collect_groups(
    task: Task,
    engine: RolloutEngine,
    examples: list[dict],
    sampler: PromptSampler,
    algo: AlgorithmConfig,
    sampling: SamplingParams,
    *,
    prompts_per_step: int,
    pad_id: int,
    all_reduce_sum: Callable[[list[int]], list[int]] = _sum_locally,
) -> StepGroups:
    """Roll out and score groups until the valid share reaches beta_th (`algo.min_valid_fraction`) or
    `algo.max_resample_attempts` extra rounds are spent.

    `sampling` holds the step's parameters (n = G); extra round k samples with seed `sampling.seed + 7k`.
    `prompts_per_step` is B over all ranks; `all_reduce_sum` sums counts over ranks."""
    pool_examples, pool_prompts, parts, rewards, components = [], [], [], [], []
    attempt = 0
    while True:
        batch = [examples[i] for i in sampler.draw(prompts_per_step)]
        params = sampling if sampling.seed is None else dataclasses.replace(sampling, seed=sampling.seed + attempt * 7)
        prompts = [task.messages(e) for e in batch]
        rollout = engine.generate(prompts, params)
        for text, index, length in zip(rollout.texts, rollout.prompt_indices, rollout.response_mask.sum(1).tolist()):
            try:
                out = task.score(text, batch[index])
            except NonFiniteReward:  # the non-finite guard (gpg_vl/guard.py) stops or skips this step
                out = SimpleNamespace(total=math.nan, components={})
            parts_of = dict(out.components)
            if algo.overlong_buffer:  # DAPO's soft overlong penalty, a reward component of its own
                parts_of["overlong"] = algorithms.overlong_penalty(int(length), algo.overlong_max_length or params.max_new_tokens, algo.overlong_buffer)
            rewards.append(out.total + parts_of.get("overlong", 0.0))
            components.append(parts_of)
        parts.append(rollout)
        pool_examples += batch
        pool_prompts += prompts
        judged = rewards if algo.valid_on == "total" else _component_values(components, algo.valid_on, task)
        valid = algorithms.valid_group_mask(torch.tensor(judged), group_size=params.n)
        pool_valid, pool_groups = all_reduce_sum([int(valid.sum()), len(valid)])
        # beta_th compares the valid groups we could train on with the batch size B (not with the pool)
        if not algorithms.needs_resampling(pool_valid / prompts_per_step, algo.min_valid_fraction):
            break
        if attempt >= algo.max_resample_attempts:
            break
        attempt += 1

    group_size = params.n
    pool = Rollout.concat(parts, pad_id, offsets=_offsets(parts))
    local_b = len(parts[0].texts) // group_size
    order = [g for g in range(len(valid)) if valid[g]] + [g for g in range(len(valid)) if not valid[g]]
    keep = order[:local_b]  # valid-first, then zero-variance groups fill up to the configured size
    rows = [g * group_size + k for g in keep for k in range(group_size)]
    kept = pool.select(rows)
    kept.prompt_indices = [i // group_size for i in range(len(rows))]
    kept_valid = valid[keep]
    global_valid, global_groups, nonfinite = all_reduce_sum([int(kept_valid.sum()), len(keep), sum(not math.isfinite(r) for r in rewards)])
    return StepGroups(
        examples=[pool_examples[g] for g in keep],
        prompts=[pool_prompts[g] for g in keep],
        rollout=kept,
        rewards=torch.tensor([rewards[r] for r in rows], dtype=torch.float32),
        components=[components[r] for r in rows],
        valid=kept_valid,
        resample_attempts=attempt,
        global_valid=global_valid,
        global_groups=global_groups,
        pool_valid_fraction=pool_valid / max(pool_groups, 1),
        nonfinite_rewards=nonfinite,
    )


def _component_values(components: list[dict[str, float]], name: str, task: Task) -> list[float]:
    """Per completion, the reward component `valid_on` names; a task that does not report it fails once, clearly."""
    for parts in components:
        if name not in parts:
            reported = ", ".join(["total", *sorted(parts)])
            raise ConfigError(f"algorithm.valid_on: task {task.name or type(task).__name__!r} reports no reward "
                              f"component {name!r}; it reports: {reported}", "algorithm.valid_on")
    return [parts[name] for parts in components]


def _offsets(parts: list[Rollout]) -> list[int]:
    offsets, total = [], 0
    for part in parts:
        offsets.append(total)
        total += max(part.prompt_indices) + 1 if part.prompt_indices else 0
    return offsets
