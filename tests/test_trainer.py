"""The trainer end to end on the tiny model: smoke run through the CLI, skip, micro-batching, resume,
corrupt checkpoints, and a real 2-process run over gloo."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import args_for, free_port, rows, weights
from gpg_vl.checkpoint import CheckpointError
from gpg_vl.cli import main

def test_two_step_smoke_run_changes_every_parameter(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    assert main(args_for(tiny_model_dir, out)) == 0
    log = rows(out)
    assert [r["step"] for r in log] == [1, 2]
    required = {"step", "loss", "reward_mean", "valid_fraction", "alpha", "resample_attempts", "step_time_s"}
    assert required <= set(log[0])
    assert all(math.isfinite(r["loss"]) and r["skipped"] == 0 for r in log)
    before, after = weights(tiny_model_dir), weights(out / "checkpoint-2")
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert not unchanged, f"parameters that did not change: {unchanged}"
    # the checkpoint is an ordinary HF folder; samples were written with their images
    from transformers import AutoModelForImageTextToText

    AutoModelForImageTextToText.from_pretrained(out / "checkpoint-2")
    sample = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    assert (out / sample["image"]).is_file() and len(sample["completions"]) == 4


def test_grpo_with_kl_and_two_iterations_trains(tiny_model_dir, tmp_path):
    """grpo with a reference model (kl_coef > 0) and two optimizer steps per rollout (num_iterations = 2).
    Invariants: the loss is finite and the weights change; the second iteration runs on the updated policy,
    so its ratio to the rollout policy is no longer 1 (the logged mean over both iterations differs from 1)
    and its KL to the frozen reference is above 0 (the first iteration's is exactly 0: policy = reference)."""
    out = tmp_path / "run"
    assert main(args_for(tiny_model_dir, out, "algorithm.name=grpo", "algorithm.kl_coef=0.1",
                         "algorithm.num_iterations=2", "checkpoint.save_every=2")) == 0  # fmt: skip
    log = rows(out)
    assert [r["step"] for r in log] == [1, 2] and all(math.isfinite(r["loss"]) and r["skipped"] == 0 for r in log)
    assert all(r["loss/kl"] > 0 and abs(r["loss/ratio_mean"] - 1) > 1e-6 for r in log), log
    before, after = weights(tiny_model_dir), weights(out / "checkpoint-2")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_step_with_only_equal_rewards_is_skipped(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    assert main(args_for(tiny_model_dir, out, "task.options={image_size: 56, mode: constant}", "train.max_steps=1")) == 0
    (log,) = rows(out)
    assert log["skipped"] == 1 and log["valid_fraction"] == 0 and log["loss"] == 0.0 and log["alpha"] == 0.0
    assert log["resample_attempts"] == 3  # tried the configured extra rounds first
    before, after = weights(tiny_model_dir), weights(out / "checkpoint-1")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_micro_batches_give_the_full_batch_update(tiny_model_dir, tmp_path):
    main(args_for(tiny_model_dir, tmp_path / "full", "train.max_steps=1", "optim.micro_batch_size=64", "optim.max_grad_norm=0"))
    main(args_for(tiny_model_dir, tmp_path / "micro", "train.max_steps=1", "optim.micro_batch_size=3", "optim.max_grad_norm=0"))
    full_log, micro_log = rows(tmp_path / "full")[0], rows(tmp_path / "micro")[0]
    # Same loss and same gradient norm: each micro-batch was normalised by the WHOLE batch's token count
    # (a per-micro-batch mean would change both). 16 sequences in chunks of 3 -> 6 micro-batches.
    assert full_log["loss"] == pytest.approx(micro_log["loss"], abs=1e-6)
    assert full_log["grad_norm"] == pytest.approx(micro_log["grad_norm"], rel=1e-5)
    # (Parameters after the step are not compared: Adam's first step is ~lr*sign(g), so coordinates whose
    # gradient is ~1e-8 flip on float noise and say nothing about normalisation.)


def test_resume_equals_uninterrupted_run(tiny_model_dir, tmp_path):
    main(args_for(tiny_model_dir, tmp_path / "straight", "train.max_steps=4"))
    main(args_for(tiny_model_dir, tmp_path / "split", "train.max_steps=2"))
    with open(tmp_path / "split" / "metrics.jsonl", "a") as f:  # a crash after logging step 3, before saving it
        f.write('{"step": 3, "loss": 0.0}\n')
    assert main(args_for(tiny_model_dir, tmp_path / "split", "train.max_steps=4") + ["--resume"]) == 0
    assert [r["step"] for r in rows(tmp_path / "split")] == [1, 2, 3, 4]
    a, b = weights(tmp_path / "straight/checkpoint-4"), weights(tmp_path / "split/checkpoint-4")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_missing_or_corrupt_checkpoint_fails_clearly(tiny_model_dir, tmp_path, capsys):
    assert main(args_for(tiny_model_dir, tmp_path / "run", "checkpoint.resume=latest")) == 2
    assert "holds no checkpoint-" in capsys.readouterr().err
    broken = tmp_path / "run" / "checkpoint-3"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{}")
    assert main(args_for(tiny_model_dir, tmp_path / "run") + ["--resume", str(broken)]) == 2
    assert "missing trainer_state.pt" in capsys.readouterr().err
    (broken / "trainer_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable"):
        from gpg_vl.checkpoint import load_trainer_state

        load_trainer_state(broken)


def test_hub_model_offline_fails_fast_with_advice(tmp_path, capsys):
    env = {"HF_HUB_OFFLINE": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        code = main(["train", "task.name=shapes", "model.name_or_path=Qwen/Qwen2-VL-2B-Instruct", f"train.output_dir={tmp_path}", "logging.progress_bar=false"])
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert code == 2
    err = capsys.readouterr().err
    assert "Qwen/Qwen2-VL-2B-Instruct" in err and "model.name_or_path=DIR" in err


@pytest.mark.slow
def test_two_processes_stay_in_sync(tiny_model_dir, tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(
        "import sys, torch, hashlib\n"
        "from gpg_vl.cli import main\n"
        "from gpg_vl.trainer import train, config_from_args\n"
        "from gpg_vl.cli import build_parser\n"
        f"args = build_parser('train').parse_args({args_for(tiny_model_dir, tmp_path / 'ddp')!r})\n"
        "import gpg_vl.trainer as t\n"
        "cfg = config_from_args(args)\n"
        "seen = {}\n"
        "orig = t.save\n"
        "def spy(accelerator, policy, *a, **k):\n"
        "    h = hashlib.sha256(b''.join(p.detach().numpy().tobytes() for p in policy.parameters())).hexdigest()\n"
        "    open(f'{sys.argv[1]}/rank{accelerator.process_index}.txt', 'w').write(h)\n"
        "    return orig(accelerator, policy, *a, **k)\n"
        "t.save = spy\n"
        "train(cfg)\n"
    )
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    h0, h1 = (tmp_path / "rank0.txt").read_text(), (tmp_path / "rank1.txt").read_text()
    assert h0 == h1  # DDP kept both ranks' parameters identical
    log = rows(tmp_path / "ddp")
    assert [r["step"] for r in log] == [1, 2] and all(math.isfinite(r["loss"]) for r in log)
