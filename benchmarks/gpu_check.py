"""The check to run the day a GPU is lent: everything in gpg-vl that has never run on one, in under 10 min.

    python benchmarks/gpu_check.py                     # gpu-marked tests, then one 2b-shape step per mode
    python benchmarks/gpu_check.py --dry-run           # print the commands, run nothing (works on the CPU)

It runs the `gpu`-marked tests, then `gpg-vl train` for 2 steps on `builtin:2b-shape` (Qwen2-VL-2B widths,
real vocabulary, no hub access) in each mode that fits on one GPU, and writes peak GPU memory and s/step
per mode to `benchmarks/results/gpu_check.json`. docs/memory.md says which of its cells this confirms.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
COMMON = [
    "--task", "cvbench", "model.name_or_path=builtin:2b-shape", "task.train_data=synthetic:32", "task.eval_data=synthetic:8",
    "train.max_steps=2", "train.prompts_per_step=4", "rollout.group_size=8", "rollout.max_new_tokens=128",
    "optim.lr=1e-5", "eval.at_end=true", "eval.max_new_tokens=32", "logging.progress_bar=false", "logging.tensorboard=false",
]
# mode -> overrides. Each line names the GPU-only path it exercises (docs/distributed.md, issue 24's bugs).
MODES = {
    "hf_auto": [],  # fp32 masters under bf16 autocast, rollouts and eval under autocast too (bug 7)
    "hf_auto_flash": ["model.attn_implementation=flash_attention_2"],  # flash-attn sees bf16 (bugs 6-7)
    "hf_bf16_weights": ["model.dtype=bfloat16", "optim.lr=1e-3"],  # 16-bit weights at a representable lr
    "hf_lora": ["model.lora={r: 16, alpha: 32}"],  # LoRA merge one delta at a time (bug 9)
    "hf_decode_dynamic": ["rollout.decode=dynamic"],  # the reference decode loop, for s/step against hf_auto (static)
    "hf_decode_cuda_graphs": ["rollout.decode=compiled"],  # the static decode step under torch.compile "reduce-overhead"
    "hf_grpo_kl": ["algorithm.name=grpo", "algorithm.kl_coef=0.04"],  # the reference in bf16 (bug 6)
    "vllm_auto": ["rollout.engine=vllm"],  # vLLM rollouts, weights pushed after each step
    "vllm_lora": ["rollout.engine=vllm", "model.lora={r: 16, alpha: 32}"],  # merged LoRA weights pushed
}


def train_command(mode: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "gpg_vl.cli", "train", *COMMON, *MODES[mode], f"train.output_dir={out}"]


def run_mode(mode: str, out: Path, timeout: int) -> dict:
    started = time.time()
    proc = subprocess.run(train_command(mode, out), capture_output=True, text=True, timeout=timeout)
    result = {"mode": mode, "returncode": proc.returncode, "wall_s": round(time.time() - started, 1)}
    done = re.search(r"done: \d+ steps, ([\d.]+) s/step .*peak memory (\d+) MiB", proc.stdout)
    if done:
        result.update(s_per_step=float(done.group(1)), peak_gpu_mib=int(done.group(2)))
    if proc.returncode:
        result["error"] = (proc.stderr.strip().splitlines() or [""])[-1][:500]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the gpu-marked tests first")
    parser.add_argument("--timeout", type=int, default=240, help="seconds per mode")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gpu_check.json")
    args = parser.parse_args(argv)
    tests = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", str(HERE.parent / "tests")]
    if args.dry_run:
        print(" ".join(tests))
        for mode in args.modes:
            print(" ".join(train_command(mode, Path("RUN"))))
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --dry-run to see the commands", file=sys.stderr)
        return 2
    report = {"device": torch.cuda.get_device_name(0), "modes": []}
    if not args.skip_tests:
        report["gpu_tests_returncode"] = subprocess.run(tests).returncode
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            result = run_mode(mode, Path(tmp) / mode, args.timeout)
            print(json.dumps(result), flush=True)
            report["modes"].append(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    failed = [r["mode"] for r in report["modes"] if r["returncode"]]
    return 1 if failed or report.get("gpu_tests_returncode") else 0


if __name__ == "__main__":
    sys.exit(main())
