"""A benchmark task: the `shapes` prompts with a reward that is a hash of the completion text.

Any two different completions almost surely get different rewards, so no group is ever all-equal and
neither trainer skips work: what is measured is the full step. Used by benchmarks/memory.py.
"""

from __future__ import annotations

import zlib

from gpg_vl import RewardOutput
from gpg_vl_tasks.shapes import ShapesTask


def hash_reward(text: str) -> float:
    """A number in [0, 1) fixed by the text (crc32, so it is the same in every process)."""
    return (zlib.crc32(text.encode("utf-8", "replace")) % 10_007) / 10_007


class HashTask(ShapesTask):
    name = "hash"
    description = "benchmark: shapes prompts, reward = hash of the completion text"

    def score(self, completion, example):
        reward = hash_reward(completion)
        return RewardOutput(reward, {"hash": reward})
