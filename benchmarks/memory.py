"""Peak memory of one training step (rollout + loss + optimizer step) on the real-width `builtin:2b-shape`
model: gpg-vl in full fp32, full bf16 and LoRA, beside TRL's GRPOTrainer (fp32, beta=0, no vLLM).

    .venv/bin/python benchmarks/memory.py                                   # the whole grid, ~30 min on 2 cores
    .venv/bin/python benchmarks/memory.py --completions 8 --tokens 64 --modes fp32 trl

`builtin:2b-shape` has Qwen2-VL-2B's widths and real 151,936-token vocabulary with 2 text and 2 vision
layers, so every term that scales with vocabulary x completion length shows at its real size. Each cell runs
in a fresh subprocess (peak RSS is per process); the reward is a hash of the text, so no group is skipped.
Completions are G=8 per prompt on 224x224 images (64 image tokens); nothing stops them early (random
weights almost never emit EOS), so each runs to `--tokens`. Prints a Markdown table and, per mode, the
marginal memory per extra completion token: (peak at the longest - peak at the shortest) / extra tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
G = 8
PIXELS = 224 * 224
MODES = {
    "fp32": ["model.dtype=float32"],
    "bf16": ["model.dtype=bfloat16"],
    "lora": ["model.dtype=float32", "model.lora={r: 16, alpha: 32}"],
}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_ours(mode: str, completions: int, tokens: int) -> dict:
    from gpg_vl import trainer
    from gpg_vl.config import load_config

    out = tempfile.mkdtemp(prefix="gpg-mem-")
    cfg = load_config(None, [
        "model.name_or_path=builtin:2b-shape", f"model.min_pixels={PIXELS}", f"model.max_pixels={PIXELS}",
        f"task.name={HERE / 'vs_trl.py'}:HashRewardTask", "task.train_data=synthetic:64", "task.options={image_size: 224}",
        f"rollout.group_size={G}", f"rollout.max_new_tokens={tokens}", f"train.prompts_per_step={completions // G}",
        "train.max_steps=1", "optim.micro_batch_size=8", "optim.lr=1e-6", "eval.at_end=false",
        "algorithm.min_valid_fraction=0", "logging.progress_bar=false", "logging.tensorboard=false",
        "logging.sample_every=0", f"train.output_dir={out}", *MODES[mode],
    ])
    trainer.save = lambda *args, **kwargs: None  # measure the step, not writing a 1.6 GB checkpoint
    start = time.time()
    metrics = trainer.train(cfg)
    return {"seconds": time.time() - start, "completion_length": metrics["completion_length"], "skipped": metrics["skipped"]}


def run_trl(completions: int, tokens: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import GRPOConfig, GRPOTrainer

    from gpg_vl.kit import build_builtin
    from gpg_vl.processor import VISION_TOKENS
    sys.path.insert(0, str(HERE))
    from vs_trl import HashRewardTask, hash_reward

    path = build_builtin("builtin:2b-shape")
    processor = AutoProcessor.from_pretrained(path, min_pixels=PIXELS, max_pixels=PIXELS)
    processor.chat_template = processor.chat_template or processor.tokenizer.chat_template
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    task = HashRewardTask(image_size=224)
    rows = []
    for example in task.load("synthetic:64", "train")[: completions // G]:
        messages = task.messages(example)
        text = next(i["text"] for i in messages[-1]["content"] if i.get("type") == "text")
        rows.append({"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}], "image": example["image"]})
    suppress = processor.tokenizer.convert_tokens_to_ids(list(VISION_TOKENS))
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-mem-"), per_device_train_batch_size=completions, num_generations=G,
        max_completion_length=tokens, max_steps=1, use_cpu=True, bf16=False, beta=0.0, loss_type="dapo",
        scale_rewards="none", gradient_checkpointing=False, report_to=[], save_strategy="no", learning_rate=1e-6,
        temperature=1.0, top_k=0, top_p=1.0, num_iterations=1, logging_steps=1, max_grad_norm=1.0,
        generation_kwargs={"suppress_tokens": suppress}, dataloader_num_workers=0,
    )

    def reward(completions, **kwargs):
        return [hash_reward(c if isinstance(c, str) else c[-1]["content"]) for c in completions]

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=Dataset.from_list(rows), processing_class=processor)
    start = time.time()
    trainer.train()
    return {"seconds": time.time() - start}


def cell(mode: str, completions: int, tokens: int) -> dict:
    """Run one cell in a fresh interpreter and return its figures."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, __file__, "--cell", mode, str(completions), str(tokens)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("CELL ")]
    if done.returncode or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)}
    return json.loads(lines[-1][5:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--completions", type=int, nargs="+", default=[8, 32], help="completions per step (G=8 each prompt)")
    p.add_argument("--tokens", type=int, nargs="+", default=[64, 320], help="new tokens per completion")
    p.add_argument("--modes", nargs="+", default=[*MODES, "trl"], choices=[*MODES, "trl"])
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--cell", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.cell:
        mode, completions, tokens = args.cell[0], int(args.cell[1]), int(args.cell[2])
        figures = run_trl(completions, tokens) if mode == "trl" else run_ours(mode, completions, tokens)
        print("CELL " + json.dumps({**figures, "peak_rss_mib": peak_rss_mib()}), flush=True)
        return 0
    results = {}
    for mode in args.modes:
        for n in args.completions:
            for t in args.tokens:
                results[f"{mode} {n} {t}"] = figures = cell(mode, n, t)
                print(f"{mode:5s} {n:3d} completions x {t:4d} tokens: {figures}", file=sys.stderr, flush=True)
    print_table(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def print_table(results: dict, args) -> None:
    cols = [(n, t) for n in args.completions for t in args.tokens]
    print("| mode | " + " | ".join(f"{n} x {t}" for n, t in cols) + " | MiB per extra token |")
    print("|---|" + "---:|" * (len(cols) + 1))
    for mode in args.modes:
        cells = [results[f"{mode} {n} {t}"] for n, t in cols]
        shown = [f"{c['peak_rss_mib']:,.0f}" if "peak_rss_mib" in c else "failed" for c in cells]
        n, lo, hi = max(args.completions), min(args.tokens), max(args.tokens)
        a, b = results.get(f"{mode} {n} {lo}", {}), results.get(f"{mode} {n} {hi}", {})
        marginal = (b["peak_rss_mib"] - a["peak_rss_mib"]) / (n * (hi - lo)) if "peak_rss_mib" in a and "peak_rss_mib" in b and hi > lo else float("nan")
        print(f"| {mode} | " + " | ".join(shown) + f" | {marginal:.3f} |")
    print("\nPeak RSS in MiB of one process for one step; columns are completions x new tokens per completion.")


if __name__ == "__main__":
    sys.exit(main())
