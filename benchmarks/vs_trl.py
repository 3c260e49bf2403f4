"""gpg-vl against TRL's GRPOTrainer at equal work: seconds per step and samples per second.

Same weights (a `make_tiny` preset built once), same synthetic shapes prompts and image size, same B, G, new
tokens, temperature 1 with top_k 0, fp32, same thread count; TRL set as close to GPG as it allows
(loss_type dapo, scale_rewards none, beta 0, one iteration, one generation per step, no grad clipping, no
vLLM, no gradient checkpointing, the four vision special tokens suppressed). The reward is a hash of the
completion text, so no group has equal rewards and neither side skips or resamples. Every run is a fresh
process; runs alternate ours, TRL, ours, TRL; the table shows medians over the steps after warm-up.
Time it alone on the machine (a second busy process distorts both sides; docs/performance.md).

    pip install trl            # benchmark-only extra: pip install 'gpg-vl[bench]'
    .venv/bin/python benchmarks/vs_trl.py --presets tiny small-20m --image-size 224 --prompts 4 --group-size 8 \
        --max-new-tokens 48 --warmup 2 --steps 5 --rounds 2 --threads 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from gpg_vl import RewardOutput
from gpg_vl_tasks.shapes import ShapesTask

HERE = Path(__file__).resolve()


def hash_reward(text: str) -> float:
    """A reward in [0, 1) that depends only on the text: distinct completions get distinct rewards."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


class HashRewardTask(ShapesTask):
    """The shapes prompts, scored by `hash_reward` (so every group is valid)."""

    name = "hash_reward"
    description = "benchmark task: shapes prompts, reward = hash of the completion text"

    def score(self, completion, example):
        reward = hash_reward(completion)
        return RewardOutput(reward, {"hash": reward})


# ---- one run per process -------------------------------------------------------------------------


def run_ours(a, out: Path) -> dict:
    """`gpg-vl train` for warmup + steps; step and rollout seconds from its metrics.jsonl."""
    pixels = a.image_size**2
    cmd = [
        sys.executable, "-m", "gpg_vl.cli", "train", f"task.name={HERE}:HashRewardTask",
        f"model.name_or_path={a.model}", f"model.min_pixels={pixels}", f"model.max_pixels={pixels}",
        "model.dtype=float32", f"task.options={{image_size: {a.image_size}}}", "task.train_data=synthetic:512",
        f"train.prompts_per_step={a.prompts}", f"rollout.group_size={a.group_size}",
        f"rollout.max_new_tokens={a.max_new_tokens}", "rollout.temperature=1.0", "rollout.top_k=0", "rollout.top_p=1.0",
        f"optim.micro_batch_size={a.prompts * a.group_size}", "optim.max_grad_norm=0", f"optim.lr={a.lr}",
        f"train.max_steps={a.warmup + a.steps}", f"train.output_dir={out}", "train.overwrite=true", "train.seed=0",  # a rerun replaces its own scratch run
        "eval.at_end=false", "eval.every=0", "logging.progress_bar=false", "logging.tensorboard=false",
        "logging.sample_every=0", "checkpoint.save_every=0", *a.ours_extra,
    ]
    subprocess.run(cmd, check=True, env=child_env(a.threads), stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][a.warmup :]
    return {
        "step_s": [r["step_time_s"] for r in rows],
        "rollout_s": [r["rollout_time_s"] for r in rows],
        "skipped": sum(r["skipped"] for r in rows),
    }


def run_trl(a) -> dict:
    """TRL GRPOTrainer for warmup + steps in THIS process (started by `--side trl`); seconds per step."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from gpg_vl.processor import VISION_TOKENS

    torch.set_num_threads(a.threads)
    task = HashRewardTask(image_size=a.image_size)
    rows = []
    for example in task.load("synthetic:512", "train"):
        images, prompt = [], []
        for message in task.messages(example):
            content = message["content"]
            if isinstance(content, list):
                content = [{"type": "image"} if item.get("type") == "image" else item for item in content]
                images += [item["image"] for item in message["content"] if item.get("type") == "image"]
            prompt.append({"role": message["role"], "content": content})
        rows.append({"prompt": prompt, "image": images[0]})
    processor = AutoProcessor.from_pretrained(a.model)
    pixels = a.image_size**2  # the same image budget as ours: 224 px stays 224 px (64 image tokens)
    processor.image_processor.size = {"shortest_edge": pixels, "longest_edge": pixels}
    for name in ("min_pixels", "max_pixels"):
        if hasattr(processor.image_processor, name):
            setattr(processor.image_processor, name, pixels)
    suppress = [processor.tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]
    model = AutoModelForImageTextToText.from_pretrained(a.model, dtype=torch.float32)

    def reward(completions, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [hash_reward(t) for t in texts]

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as tmp:
        config = GRPOConfig(
            output_dir=tmp, max_steps=a.warmup + a.steps, learning_rate=a.lr, seed=0,
            per_device_train_batch_size=a.prompts * a.group_size,  # TRL counts completions, not prompts
            num_generations=a.group_size, max_completion_length=a.max_new_tokens,
            temperature=1.0, top_k=0, top_p=1.0, generation_kwargs={"suppress_tokens": suppress},
            loss_type="dapo", scale_rewards="none", beta=0.0, num_iterations=1, steps_per_generation=1,
            max_grad_norm=0.0, use_vllm=False, use_cpu=not torch.cuda.is_available(), bf16=False,
            gradient_checkpointing=False, report_to="none", save_strategy="no", logging_steps=1,
            dataloader_num_workers=0, lr_scheduler_type="constant",
        )
        trainer = GRPOTrainer(
            model=model, reward_funcs=[reward], args=config, train_dataset=Dataset.from_list(rows),
            processing_class=processor, callbacks=[StepTimer()],
        )
        trainer.train()
    return {"step_s": times[a.warmup :]}


def child_env(threads: int) -> dict:
    # every process gets the same, explicit thread count (OpenMP spin-waits when two fight for cores)
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}


# ---- the race ------------------------------------------------------------------------------------


def race(a, preset: str, work: Path) -> dict:
    from gpg_vl.tiny import make_tiny

    model = make_tiny(work / preset, preset=preset, seed=0)
    results: dict[str, list[dict]] = {"ours": [], "trl": []}
    for r in range(a.rounds):
        for side in ("ours", "trl"):  # alternated: A B A B
            print(f"[{preset}] round {r + 1}/{a.rounds}: {side}", flush=True)
            args = argparse.Namespace(**{**vars(a), "model": str(model)})
            if side == "ours":
                results[side].append(run_ours(args, work / f"{preset}-ours-{r}"))
            else:
                out = work / f"{preset}-trl-{r}.json"
                cmd = [sys.executable, str(HERE), "--side", "trl", "--model", str(model), "--json", str(out), *side_args(a)]
                subprocess.run(cmd, check=True, env=child_env(a.threads))
                results[side].append(json.loads(out.read_text()))
    return results


def side_args(a) -> list[str]:
    keys = ("image_size", "prompts", "group_size", "max_new_tokens", "warmup", "steps", "threads", "lr")
    return [x for k in keys for x in (f"--{k.replace('_', '-')}", str(getattr(a, k)))]


def table(a, all_results: dict[str, dict]) -> str:
    samples = a.prompts * a.group_size
    lines = [
        f"vs TRL: B={a.prompts} prompts x G={a.group_size}, {a.max_new_tokens} new tokens, {a.image_size} px, fp32, "
        f"{a.threads} thread(s), median of {a.steps} steps x {a.rounds} runs after {a.warmup} warm-up; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {date.today()}",
        "",
        "| preset | side | s/step | samples/s | rollout s | training s | ours / TRL samples/s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for preset, res in all_results.items():
        ours = statistics.median([t for run in res["ours"] for t in run["step_s"]])
        trl = statistics.median([t for run in res["trl"] for t in run["step_s"]])
        rollout = statistics.median([t for run in res["ours"] for t in run["rollout_s"]])
        lines.append(f"| {preset} | gpg-vl | {ours:.2f} | {samples / ours:.1f} | {rollout:.2f} | {ours - rollout:.2f} | {trl / ours:.2f}x |")
        lines.append(f"| {preset} | TRL | {trl:.2f} | {samples / trl:.1f} | | | |")
        if any(run["skipped"] for run in res["ours"]):
            lines.append(f"| {preset} | (ours skipped a step: a group had equal rewards; rerun) | | | | | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "small-20m"], help="make-tiny presets to race on")
    p.add_argument("--image-size", type=int, default=224, help="square images of this many pixels per side")
    p.add_argument("--prompts", type=int, default=4, help="B: prompts per step")
    p.add_argument("--group-size", type=int, default=8, help="G: completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--warmup", type=int, default=2, help="steps per run left out of the timing")
    p.add_argument("--steps", type=int, default=5, help="timed steps per run")
    p.add_argument("--rounds", type=int, default=2, help="runs per side, alternated")
    p.add_argument("--threads", type=int, default=2, help="torch/OpenMP threads of every run")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--out", type=Path, help="folder for the runs and table.md (default: a temporary one)")
    p.add_argument("--side", choices=["trl"], help=argparse.SUPPRESS)  # internal: one TRL run in this process
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.ours_extra = []
    if a.side == "trl":
        a.json.write_text(json.dumps(run_trl(a)))
        return 0
    try:
        import trl  # noqa: F401
    except ImportError:
        print("benchmarks/vs_trl.py needs trl: pip install trl", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        work = a.out or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = {preset: race(a, preset, work) for preset in a.presets}
        text = table(a, results)
        print("\n" + text)
        if a.out:
            (a.out / "table.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
