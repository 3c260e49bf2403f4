"""The non-finite guard: every step's rewards, loss, global gradient norm and updated weights are checked.

A non-finite reward, loss or gradient norm means the optimizer step is not applied; `train.on_nonfinite`
says whether the run then stops (NonFiniteError, exit status 3) or skips the step. Non-finite weights after
an update, or MAX_SKIPS_IN_A_ROW skipped steps in a row, always stop the run. The trainer calls
`NonFiniteGuard.check_step` before `optimizer.step()` and `check_weights` after it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

MAX_SKIPS_IN_A_ROW = 5  # a run that cannot take one good step in 5 has diverged; more skips only burn compute


NONFINITE = ("non-finite reward (the task's reward returned NaN or inf)", "non-finite loss", "non-finite gradient norm")


class NonFiniteError(RuntimeError):
    """A step's reward, loss, gradient norm or weights were NaN or infinite (exit status 3)."""


def weights_finite(params) -> bool:
    """True when the float32 norm (root of the sum of squares) of every (local shard of a) parameter is finite: one host sync.

    Stricter than isfinite on purpose: weights of 1e30 (optim.lr=1e30) are finite, but their products
    overflow in the next forward, which then dies in sampling; their squares overflow here instead."""
    sums = []
    for p in params:
        t = p.to_local() if hasattr(p, "to_local") else p  # an FSDP2 DTensor: this rank's shard
        if t.numel():  # ZeRO-3 leaves empty placeholders on every rank
            # the norm overflows exactly when the sum of squares does, without a squared copy of the weights
            sums.append(torch.linalg.vector_norm(t.detach(), dtype=torch.float32))
    return bool(torch.isfinite(torch.stack(sums)).all()) if sums else True


class NonFiniteGuard:
    """Counts skipped steps and raises with one line; `last_good` names the newest checkpoint (or none)."""

    def __init__(self, mode: str, lr: float, output_dir: str | Path):
        self.mode, self.lr, self.output_dir = mode, lr, Path(output_dir)
        self.in_a_row, self.total = 0, 0

    def last_good(self) -> str:
        from gpg_vl.checkpoint import list_checkpoints  # checkpoints are only saved from finite weights

        found = list_checkpoints(self.output_dir)
        return str(found[-1]) if found else "none (no checkpoint saved yet)"

    def fail(self, step: int, what: str) -> NonFiniteError:
        return NonFiniteError(f"step {step}: {what} (optim.lr={self.lr:g}?); last good checkpoint: {self.last_good()}")

    @staticmethod
    def flags(rewards, loss: float, grad_norm: float) -> list[int]:
        """1 for each of NONFINITE that is NaN or inf on this rank (summed over ranks, then `reason`)."""
        reward_bad = rewards is not None and not all(math.isfinite(float(r)) for r in rewards)
        return [int(reward_bad), int(not math.isfinite(loss)), int(not math.isfinite(grad_norm))]

    @staticmethod
    def reason(flags: list[int]) -> str | None:
        """The first non-finite value of a step, in the order they are computed; None when all are finite."""
        return next((what for what, hit in zip(NONFINITE, flags) if hit), None)

    def check_step(self, step: int, bad: str | None) -> bool:
        """Decide for a step whose first non-finite value is `bad` (agreed by every rank): True to apply it."""
        if bad is None:
            self.in_a_row = 0
            return True
        if self.mode == "stop":
            raise self.fail(step, bad)
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row >= MAX_SKIPS_IN_A_ROW:
            raise self.fail(step, f"{bad}, {self.in_a_row} steps in a row skipped (train.on_nonfinite=skip)")
        return False

    def check_weights(self, step: int, finite: bool) -> None:
        if not finite:
            raise self.fail(step, "non-finite weights after the optimizer step (their squares overflow float32)")
