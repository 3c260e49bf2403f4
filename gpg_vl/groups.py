"""Collecting a step's groups: roll out, score, and resample below the valid-group threshold (GPG's beta_th).

A group whose G rewards are all equal has zero advantage and gives no gradient. When the share of valid
(non-equal) groups is below `min_valid_fraction`, more prompts are drawn and rolled out, up to
`max_resample_attempts` extra rounds; then the batch is filled valid-first to its configured size. All
counts are summed over processes, so every rank takes the same decisions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gpg_vl import algorithms
from gpg_vl.rollout.base import Rollout, RolloutEngine, SamplingParams
from gpg_vl.task import Task


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
    valid: torch.Tensor  # [B_local] bool: rewards not all equal
    resample_attempts: int  # extra rollout rounds this step took
    global_valid: int  # valid groups in the trained batch, all ranks
    global_groups: int  # B, all ranks
    pool_valid_fraction: float  # share of valid groups among everything rolled out, all ranks


def collect_groups(
    task: Task,
    engine: RolloutEngine,
    examples: list[dict],
    sampler: PromptSampler,
    prompts_per_step: int,  # B over all ranks
    sampling: Callable[[int], SamplingParams],  # attempt -> sampling params (n = G, per-attempt seed)
    min_valid_fraction: float,
    max_resample_attempts: int,
    pad_id: int,
    all_reduce_sum: Callable[[list[int]], list[int]] = lambda xs: xs,
) -> StepGroups:
    """Roll out and score groups until the valid share reaches the threshold or attempts run out."""
    pool_examples, pool_prompts, parts, rewards, components = [], [], [], [], []
    attempt = 0
    while True:
        batch = [examples[i] for i in sampler.draw(prompts_per_step)]
        params = sampling(attempt)
        prompts = [task.messages(e) for e in batch]
        rollout = engine.generate(prompts, params)
        for text, index in zip(rollout.texts, rollout.prompt_indices):
            out = task.score(text, batch[index])
            rewards.append(out.total)
            components.append(out.components)
        parts.append(rollout)
        pool_examples += batch
        pool_prompts += prompts
        valid = algorithms.valid_group_mask(torch.tensor(rewards), group_size=params.n)
        pool_valid, pool_groups = all_reduce_sum([int(valid.sum()), len(valid)])
        # beta_th compares the valid groups we could train on with the batch size B
        if pool_valid >= min_valid_fraction * prompts_per_step or attempt >= max_resample_attempts:
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
    global_valid, global_groups = all_reduce_sum([int(kept_valid.sum()), len(keep)])
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
    )


def _offsets(parts: list[Rollout]) -> list[int]:
    offsets, total = [], 0
    for part in parts:
        offsets.append(total)
        total += max(part.prompt_indices) + 1 if part.prompt_indices else 0
    return offsets
