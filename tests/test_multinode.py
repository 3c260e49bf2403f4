"""Two "machines" on loopback, one process each, started as two separate `accelerate launch` commands with
docs/distributed.md's two-machine flags (`--num_machines 2 --machine_rank 0|1 --main_process_ip ...
--main_process_port ...`, plus `--deepspeed_multinode_launcher standard` for ZeRO), with only the address
(127.0.0.1), the process count (1 per machine), the precision (no bf16 on this CPU) and the tiny model and
data changed. Invariant: both machines train a few steps and evaluate, and the main machine writes the
metrics and a checkpoint."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_deepspeed import free_port
from test_trainer import args_for, rows

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
DOCS = (ROOT / "docs" / "distributed.md").read_text()
CASES = {
    "ddp": (ROOT / "configs" / "accelerate" / "ddp_gpu.yaml", []),
    "zero2": (ROOT / "configs" / "deepspeed" / "zero2.yaml", ["--deepspeed_multinode_launcher", "standard"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_machines_on_loopback_train_and_evaluate(case, tiny_model_dir, tmp_path):
    config, extra = CASES[case]
    # the flags this test uses are the ones the page gives for two machines
    for flag in ("--num_machines 2", "--machine_rank 0", "--machine_rank 1", "--main_process_ip", "--main_process_port", *extra):
        assert flag in DOCS, flag
    assert f"--config_file configs/{config.parent.name}/{config.name}" in DOCS
    out = tmp_path / "run"
    argv = args_for(tiny_model_dir, out, "train.max_steps=2", "eval.at_end=true", "task.eval_data=synthetic:4", "eval.max_new_tokens=4")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    for machine in (0, 1):
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
            "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(machine),
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), *extra, "--mixed_precision", "no",
            "-m", "gpg_vl.cli", *argv,
        ]
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        try:
            results.append(p.communicate(timeout=400))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-4000:]
    log = rows(out)
    assert [r["step"] for r in log] == [1, 2] and all(math.isfinite(r["loss"]) for r in log)
    assert any(k.startswith("eval/") for k in log[-1])
    assert (out / "checkpoint-2" / "model.safetensors").is_file()
