"""A test task whose reward is a fixed function of the completion text, so a random tiny model still
produces groups with unequal rewards (or, with mode="constant", only equal ones)."""

from gpg_vl import RewardOutput
from gpg_vl_tasks.shapes import ShapesTask


class ScriptedTask(ShapesTask):
    name = "scripted"
    description = "test task: reward = parity of the completion length"

    def __init__(self, mode: str = "parity", **options):
        super().__init__(**options)
        self.mode = mode

    def score(self, completion, example):
        reward = 1.0 if self.mode == "constant" else float(len(completion) % 2)
        return RewardOutput(reward, {"scripted": reward})
