"""DeepSpeed ZeRO-2 and ZeRO-3 through the real trainer, on 2 CPU processes over gloo (DeepSpeed's CPU
accelerator), launched by `accelerate launch` with the shipped configs/deepspeed/*.yaml and only the process
count, precision and port overridden. Invariants: losses and gradient norms equal plain DDP's; the
checkpoint is a plain HF folder with DDP's key names and each rank's optimizer shard; held-out evaluation
with uneven slices finishes and agrees with DDP; a resume reproduces the uninterrupted run bit for bit;
GRPO with a KL reference and LoRA train under both stages.

The shm-comm op DeepSpeed JIT-builds at init is skipped (gpg_vl.distributed.make_accelerator), so no test
waits for g++."""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_trainer import args_for, rows, weights

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
LAUNCHERS = {
    "ddp": ROOT / "configs" / "accelerate" / "ddp_cpu.yaml",
    "zero2": ROOT / "configs" / "deepspeed" / "zero2.yaml",
    "zero3": ROOT / "configs" / "deepspeed" / "zero3.yaml",
}
# 3 steps, 2 micro-batches per rank and step; 5 held-out examples: rank 0 gets 3 (2 batches of 2), rank 1 gets 2 (1 batch)
COMMON = [
    "train.max_steps=3", "checkpoint.save_every=1", "checkpoint.keep_last=3", "optim.lr=1e-3", "optim.micro_batch_size=3",
    "eval.at_end=true", "task.eval_data=synthetic:5", "task.eval_limit=5", "eval.batch_size=2", "eval.max_new_tokens=4",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(model_dir: Path, out: Path, launcher: str, *extra) -> Path:
    argv = args_for(model_dir, out, "train.prompts_per_step=4", *COMMON, *extra)
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCHERS[launcher]),
        "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port()),
        "-m", "gpg_vl.cli", *argv,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from gpg_vl.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("ds_models") / "tiny", seed=0)


@pytest.fixture(scope="module")
def ddp_run(model_dir, tmp_path_factory):
    return launch(model_dir, tmp_path_factory.mktemp("ddp") / "run", "ddp")


def assert_trains_like(reference: Path, run: Path, rel=1e-4):
    a, b = rows(reference), rows(run)
    assert [r["step"] for r in b] == [1, 2, 3]
    for x, y in zip(a, b):
        assert math.isfinite(y["loss"])
        assert y["loss"] == pytest.approx(x["loss"], rel=rel, abs=1e-6)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=rel)


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_zero_trains_like_ddp_evaluates_uneven_slices_and_resumes_exactly(stage, model_dir, ddp_run, tmp_path):
    from transformers import AutoModelForImageTextToText

    run = launch(model_dir, tmp_path / "run", stage)
    assert_trains_like(ddp_run, run)
    # held-out eval over 3 + 2 examples (rank 0 runs 2 batches, rank 1 one): finished, and the same numbers as DDP
    eval_keys = [k for k in rows(ddp_run)[-1] if k.startswith("eval/")]
    assert eval_keys and all(rows(run)[-1][k] == pytest.approx(rows(ddp_run)[-1][k]) for k in eval_keys)
    # the checkpoint: DDP's key names (model.*, not model.model.*), DDP's weights, one optimizer shard per rank
    wa, wb = weights(ddp_run / "checkpoint-3"), weights(run / "checkpoint-3")
    assert sorted(wb) == sorted(wa)
    for k in wa:  # Adam's early steps are ~lr*sign(g): float noise can flip a near-zero coordinate, no more
        assert torch.allclose(wa[k], wb[k], atol=3 * 2 * 1e-3), k
    assert sorted(p.name for p in (run / "checkpoint-3" / "optimizer-shards").iterdir()) == ["rank0.pt", "rank1.pt"]
    loaded = AutoModelForImageTextToText.from_pretrained(run / "checkpoint-3")
    for name, tensor in loaded.state_dict().items():
        if name.endswith("embed_tokens.weight"):
            assert torch.equal(tensor, wb["model.embed_tokens.weight"])
    # exact resume: the same run cut after step 2, then --resume, ends with the same weights bit for bit
    split = tmp_path / "split"
    shutil.copytree(run, split)
    shutil.rmtree(split / "checkpoint-3")
    lines = (split / "metrics.jsonl").read_text().splitlines()
    (split / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")
    launch(model_dir, split, stage, "--resume")
    wc = weights(split / "checkpoint-3")
    assert all(torch.equal(wb[k], wc[k]) for k in wb), f"{stage} resume must equal the uninterrupted run"
    assert [r["step"] for r in rows(split)][-1] == 3


@pytest.fixture(scope="module")
def ddp_grpo_lora(model_dir, tmp_path_factory):
    return launch(model_dir, tmp_path_factory.mktemp("ddp_grpo") / "run", "ddp", *GRPO_LORA)


GRPO_LORA = ["algorithm.name=grpo", "algorithm.kl_coef=0.1", "model.lora.r=4", "optim.lr=1e-2", "eval.at_end=false"]


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_zero_grpo_with_kl_reference_and_lora(stage, model_dir, ddp_grpo_lora, tmp_path):
    """GRPO's reference model under DeepSpeed (partitioned under ZeRO-3: it must be an engine of its own) and
    LoRA adapters: the same losses, KL and grad norms as DDP, and a merged plain HF checkpoint."""
    run = launch(model_dir, tmp_path / "run", stage, *GRPO_LORA)
    assert_trains_like(ddp_grpo_lora, run)
    for x, y in zip(rows(ddp_grpo_lora), rows(run)):
        assert y["loss/kl"] == pytest.approx(x["loss/kl"], rel=1e-3, abs=1e-7)
    assert any(r["loss/kl"] > 0 for r in rows(run))  # the policy moved away from a reference that really ran
    wa, wb = weights(ddp_grpo_lora / "checkpoint-3"), weights(run / "checkpoint-3")
    assert sorted(wb) == sorted(wa) and not any("lora_" in k or "base_layer" in k for k in wb)
    base = weights(model_dir)
    assert any(not torch.equal(base[k], wb[k]) for k in base)  # the adapters were merged in
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-4), k
    state = torch.load(run / "checkpoint-3" / "trainer_state.pt", weights_only=False)
    assert state["adapter"] and json.loads((run / "checkpoint-3" / "config.json").read_text())
