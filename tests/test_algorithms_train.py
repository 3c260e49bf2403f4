"""dapo, gspo, rloo and cispo train through the CLI on the tiny model, and the rollout correction (TIS) and the
mismatch metrics work against a real HF engine whose returned log-probs are deliberately shifted."""

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from conftest import args_for, rows, weights
from gpg_vl.cli import main
from gpg_vl.rollout import ENGINES


def quickstart_args(model_dir, out, *extra) -> list[str]:
    """`gpg-vl train --config configs/quickstart.yaml` cut to two quick steps of the scripted task."""
    return ["train", "--config", "configs/quickstart.yaml", *args_for(model_dir, out, "eval.at_start=false", *extra)[1:]]


@pytest.mark.parametrize("name", ["dapo", "gspo", "rloo", "cispo"])
def test_new_algorithm_trains_through_the_cli(name, tiny_model_dir, tmp_path, monkeypatch):
    """Invariants: two steps run with a finite loss and no skip, the weights change, and the HF engine's own
    log-probs match the trainer's (the mismatch metric is logged every step and is ~0)."""
    monkeypatch.chdir(Path(__file__).parents[1])  # configs/quickstart.yaml is written from the repository root
    out = tmp_path / "run"
    assert main(quickstart_args(tiny_model_dir, out, f"algorithm.name={name}", "checkpoint.save_every=2")) == 0
    log = rows(out)
    assert [r["step"] for r in log] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["skipped"] == 0 for r in log), log
    assert all(r["rollout/mismatch_mean"] < 1e-3 and r["rollout/mismatch_max"] < 1e-2 for r in log), log
    before, after = weights(tiny_model_dir), weights(out / "checkpoint-2")
    assert any(not torch.equal(before[k], after[k]) for k in before)


class ShiftedEngine:
    """The real HF engine; only the log-probs it returns are shifted by `shift` on completion tokens, as a
    rollout engine with other kernels (vLLM) would report them."""

    def __init__(self, inner, shift: float):
        self.inner, self.shift = inner, shift

    def generate(self, prompts, params):
        rollout = self.inner.generate(prompts, params)
        return dataclasses.replace(rollout, logprobs=rollout.logprobs + self.shift * rollout.response_mask)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def shifted_engine(monkeypatch, shift: float) -> None:
    real = ENGINES["hf"]
    monkeypatch.setitem(ENGINES, "shifted_hf", lambda *a, **k: ShiftedEngine(real(*a, **k), shift))


def test_tis_reweights_by_the_truncated_trainer_to_engine_ratio(tiny_model_dir, tmp_path, monkeypatch):
    """Invariants, with the engine's log-probs shifted by +0.3: the mismatch metrics read 0.3; with
    rollout_correction=tis every token's weight is exp(-0.3) (below the cap), so the step-1 loss is exactly
    exp(-0.3) times the uncorrected one on the same rollout; shifted by -1.0 the weight e^1 is capped at 2."""
    shifted_engine(monkeypatch, 0.3)
    base = ["rollout.engine=shifted_hf", "train.max_steps=1"]
    assert main(args_for(tiny_model_dir, tmp_path / "none", *base)) == 0
    assert main(args_for(tiny_model_dir, tmp_path / "tis", *base, "algorithm.rollout_correction=tis")) == 0
    (plain,), (tis,) = rows(tmp_path / "none"), rows(tmp_path / "tis")
    for r in (plain, tis):
        assert r["rollout/mismatch_mean"] == pytest.approx(0.3, abs=1e-3)
        assert r["rollout/mismatch_max"] == pytest.approx(0.3, abs=1e-2)
    assert "loss/tis_weight_mean" not in plain
    assert tis["loss/tis_weight_mean"] == pytest.approx(math.exp(-0.3), abs=1e-3) and tis["loss/tis_capped_fraction"] == 0
    assert abs(plain["loss"]) > 1e-6
    assert tis["loss"] == pytest.approx(math.exp(-0.3) * plain["loss"], rel=1e-3)

    shifted_engine(monkeypatch, -1.0)
    assert main(args_for(tiny_model_dir, tmp_path / "capped", *base, "algorithm.rollout_correction=tis",
                         "algorithm.tis_cap=2.0")) == 0  # fmt: skip
    (capped,) = rows(tmp_path / "capped")
    assert capped["rollout/mismatch_mean"] == pytest.approx(1.0, abs=1e-3)
    assert capped["loss/tis_weight_mean"] == pytest.approx(2.0) and capped["loss/tis_capped_fraction"] == 1.0


def test_dapo_overlong_penalty_is_a_reward_component(tiny_model_dir, tmp_path):
    """Invariants with L_max = rollout.max_new_tokens = 6 and L_cache = 3: every total reward is the task's
    plus the penalty (so the logged means add up), the penalty lies in [-1, 0], and each truncated
    completion (length 6 = L_max) costs exactly 1, so the mean is at most -truncated_fraction."""
    out = tmp_path / "run"
    assert main(args_for(tiny_model_dir, out, "algorithm.name=dapo", "algorithm.overlong_buffer=3", "train.max_steps=1")) == 0
    (row,) = rows(out)
    assert row["reward_mean"] == pytest.approx(row["reward/scripted"] + row["reward/overlong"], abs=1e-6)
    assert -1.0 <= row["reward/overlong"] <= -row["truncated_fraction"] + 1e-9


def test_on_policy_twins_train_as_the_algorithms_they_reduce_to(tiny_model_dir, tmp_path):
    """Invariant behind docs/algorithms.md#reductions (num_iterations=1, HF rollouts: every ratio is 1): two
    steps of dapo and of cispo end at GPG-with-std's weights, and gspo at GRPO-without-KL's, to float rounding;
    rloo (advantages x G/(G-1)) is not among them: Adam undoes the scale, but max_grad_norm clipping does not."""
    def run(name, *extra):
        out = tmp_path / name
        assert main(args_for(tiny_model_dir, out, "checkpoint.save_every=2", "optim.max_grad_norm=0", *extra)) == 0
        return weights(out / "checkpoint-2")

    gpg_std = run("gpg_std", "algorithm.std_normalize=true")
    grpo = run("grpo", "algorithm.name=grpo")
    for name, expected in (("dapo", gpg_std), ("cispo", gpg_std), ("gspo", grpo)):
        got = run(name, f"algorithm.name={name}")
        worst = max((got[k] - expected[k]).abs().max().item() for k in got)
        assert worst < 1e-6, f"{name}: weights differ by up to {worst}"
    plain = run("gpg")  # the control: other advantages (no std) end elsewhere, so the comparison can fail
    assert max((plain[k] - gpg_std[k]).abs().max().item() for k in plain) > 1e-4
