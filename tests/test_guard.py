"""The non-finite guard (gpg_vl/guard.py): a diverging run (optim.lr=1e30) stops with one line and exit
status 3 before any non-finite weights reach a checkpoint; a reward that is NaN once stops the run
(train.on_nonfinite=stop) or skips that one step and trains on (skip)."""

from __future__ import annotations

import math

import torch
from conftest import args_for, rows, weights

from gpg_vl import RewardOutput, cli
from gpg_vl.guard import MAX_SKIPS_IN_A_ROW, NonFiniteError, NonFiniteGuard
from gpg_vl_tasks.shapes import ShapesTask

NAN_TASK = f"{__file__}:NanOnceTask"


class NanOnceTask(ShapesTask):
    """Reward = parity of the completion length, except the very first completion scored: NaN."""

    name = "nan-once"

    def __init__(self, **options):
        super().__init__(**options)
        self.calls = 0

    def score(self, completion, example):
        self.calls += 1
        reward = math.nan if self.calls == 1 else float(len(completion) % 2)
        return RewardOutput(reward, {"parity": reward})


def test_lr_1e30_stops_with_one_line_exit_3_and_no_nonfinite_checkpoint(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(args_for(tiny_model_dir, out, "optim.lr=1e30", "train.max_steps=6", "checkpoint.save_every=1"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3, err
    line = err[-1]
    assert line.startswith("gpg-vl train: error: step ") and "non-finite" in line and "(optim.lr=1e+30?); last good checkpoint: " in line, line
    for ckpt in sorted(out.glob("checkpoint-*")):  # whatever was saved holds finite weights only
        assert all(torch.isfinite(t).all() for t in weights(ckpt).values()), ckpt


def test_nan_reward_once_stops_by_default(tiny_model_dir, tmp_path, capsys):
    code = cli.main(args_for(tiny_model_dir, tmp_path / "run", f"task.name={NAN_TASK}"))
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 3
    assert line.startswith("gpg-vl train: error: step 1: non-finite reward") and "last good checkpoint: none" in line, line


def test_nan_reward_once_is_skipped_and_the_run_trains_on(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(args_for(tiny_model_dir, out, f"task.name={NAN_TASK}", "train.on_nonfinite=skip", "train.max_steps=3"))
    assert code == 0
    assert [r["step"] for r in rows(out)] == [1, 2, 3]
    assert "step 1: 1 non-finite reward (the task's reward returned NaN or inf); step not applied" in capsys.readouterr().out
    final = weights(out / "checkpoint-3")
    assert all(torch.isfinite(t).all() for t in final.values())
    assert any(not torch.equal(final[k], v) for k, v in weights(tiny_model_dir).items() if k in final)  # steps 2-3 trained


def test_skip_mode_stops_after_max_skips_in_a_row_and_a_good_step_resets_the_count(tmp_path):
    guard = NonFiniteGuard("skip", 1e-3, tmp_path)
    bad = NonFiniteGuard.reason(NonFiniteGuard.flags([0.0, 1.0], 0.5, float("nan")))
    assert bad == "non-finite gradient norm"
    for step in range(1, MAX_SKIPS_IN_A_ROW):
        assert guard.check_step(step, bad) is False
    assert guard.check_step(MAX_SKIPS_IN_A_ROW, None) is True  # a good step: the count starts again
    for step in range(MAX_SKIPS_IN_A_ROW - 1):
        guard.check_step(step, bad)
    try:
        guard.check_step(99, bad)
    except NonFiniteError as e:
        assert str(e).startswith(f"step 99: non-finite gradient norm, {MAX_SKIPS_IN_A_ROW} steps in a row skipped")
    else:
        raise AssertionError("the guard let a 5th skip in a row pass")
