"""The sharded path that runs on this CPU: 2 processes over gloo with `train.sharding=fsdp` (torch FSDP2)
train like plain DDP (same losses and gradient norms, parameters within float noise), hold each parameter
as a shard, and resume exactly (full weights and optimizer state gathered into the checkpoint)."""

import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import args_for, free_port, rows, weights

pytestmark = pytest.mark.slow


def launch(tmp_path, name, *extra, port):
    out = tmp_path / name
    script = tmp_path / f"{name}.py"
    argv = args_for(tmp_path.parent / "model", out, "train.prompts_per_step=4", *extra)
    script.write_text(
        "import sys\n"
        "from gpg_vl.cli import main\n"
        "import gpg_vl.trainer as t\n"
        "orig = t.shard_model\n"
        "def spy(model, device):\n"
        "    model = orig(model, device)\n"
        "    full = sum(p.numel() for p in model.parameters())\n"
        "    local = sum(p.to_local().numel() for p in model.parameters())\n"
        "    open(sys.argv[1], 'a').write(f'{local} {full}\\n')\n"
        "    return model\n"
        "t.shard_model = spy\n"
        f"sys.exit(main({argv!r}))\n"
    )
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), str(script), str(tmp_path / f"{name}.shards")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_fsdp_trains_like_ddp_and_resumes_exactly(tiny_model_dir, tmp_path):
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path.parent / "model", dirs_exist_ok=True)
    common = ["train.max_steps=3", "checkpoint.save_every=1", "checkpoint.keep_last=3", "optim.lr=1e-3", "optim.micro_batch_size=3"]
    ddp = launch(tmp_path, "ddp", *common, port=free_port())
    fsdp = launch(tmp_path, "fsdp", *common, "train.sharding=fsdp", port=free_port())
    # every rank held about half of every parameter
    for line in (tmp_path / "fsdp.shards").read_text().splitlines():
        local, full = map(int, line.split())
        assert local < 0.6 * full
    a, b = rows(ddp), rows(fsdp)
    assert [r["step"] for r in b] == [1, 2, 3]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4, abs=1e-6)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
        assert math.isfinite(y["loss"])
    wa, wb = weights(ddp / "checkpoint-3"), weights(fsdp / "checkpoint-3")
    assert wa.keys() == wb.keys()
    for k in wa:  # Adam's early steps are ~lr*sign(g): float noise can flip a near-zero coordinate, no more
        assert torch.allclose(wa[k], wb[k], atol=3 * 2 * 1e-3), k
    # exact resume: 2 steps, then --resume to 3, equals the straight 3-step FSDP run bit for bit
    split = launch(tmp_path, "split", *common, "train.sharding=fsdp", "train.max_steps=2", port=free_port())
    resumed = launch(tmp_path, "split", *common, "train.sharding=fsdp", "--resume", port=free_port())
    assert resumed == split
    wc = weights(split / "checkpoint-3")
    assert all(torch.equal(wb[k], wc[k]) for k in wb), "FSDP resume must equal the uninterrupted run"
    state = torch.load(split / "checkpoint-3" / "trainer_state.pt", weights_only=False)
    moments = state["optimizer"]["state"]
    assert moments and all("exp_avg" in s for s in moments.values())  # the whole optimizer state was gathered


def test_fsdp_lora_saves_merged_plain_weights_and_whole_adapters(tiny_model_dir, tmp_path):
    """Bug 8: under FSDP2 a LoRA checkpoint held PEFT-internal names (`base_layer`, `lora_A`) unmerged, and
    `trainer_state.pt` kept only rank 0's shard of each adapter. Invariant: the folder has the plain HF key
    names with the adapters merged in, and the saved adapters have their full shapes."""
    import shutil

    from safetensors.torch import load_file

    shutil.copytree(tiny_model_dir, tmp_path.parent / "model", dirs_exist_ok=True)
    lora = ["train.max_steps=1", "optim.lr=1e-2", "model.lora={r: 4, alpha: 8}", "train.sharding=fsdp"]
    run = launch(tmp_path, "lora", *lora, port=_free_port())
    saved = weights(run / "checkpoint-1")
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    assert sorted(saved) == sorted(base)  # plain names, nothing of peft's
    assert any(not torch.equal(saved[k], base[k]) for k in base)  # the adapters were merged in (lr 1e-2)
    state = torch.load(run / "checkpoint-1" / "trainer_state.pt", weights_only=False)
    for name, tensor in state["adapter"].items():
        if "lora_A" in name:
            assert tensor.shape[0] == 4, name  # [r, in], whole
        if "lora_B" in name:
            assert tensor.shape[1] == 4 and tensor.shape[0] > 4, name  # [out, r], whole, not out/2


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
