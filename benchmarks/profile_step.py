"""Where one training step's time goes, by stage, with the shared prompt prefix on and off.

Runs `gpg_vl.trainer.train` in this process on a `make_tiny` preset with timers around the stages (the
rollout engine's `generate`, scoring and grouping, the training forward, backward, optimizer step) and
prints one Markdown table per setting: median seconds per step after the warm-up steps.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/profile_step.py --preset small-20m --image-size 224 \
        --prompts 4 --group-size 8 --max-new-tokens 48 --warmup 1 --steps 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve()


class StageTimer:
    """Wraps callables so their wall time adds up per stage and per step."""

    def __init__(self):
        self.current: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []

    def wrap(self, stage: str, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[stage] += time.perf_counter() - t0

        return timed

    def end_step(self, total: float, rollout_total: float) -> None:
        stages = dict(self.current)
        stages["scoring + grouping"] = rollout_total - stages.get("rollout: generate", 0.0)
        stages["other"] = total - sum(stages.values())
        stages["step"] = total
        self.steps.append(stages)
        self.current = defaultdict(float)


def profile(a, shared: bool, work: Path) -> list[dict[str, float]]:
    import torch
    from accelerate import Accelerator

    import gpg_vl.trainer as trainer
    from gpg_vl.cli import build_parser
    from gpg_vl.logger import RunLogger

    timer = StageTimer()
    patches = []

    def patch(owner, name, stage):
        original = getattr(owner, name)
        patches.append((owner, name, original))
        setattr(owner, name, timer.wrap(stage, original))

    def make_engine(*args, **kwargs):
        engine = real_make_engine(*args, **kwargs)
        engine.share_prefix = shared  # the HF engine's prompt-once rollout
        patch(engine, "generate", "rollout: generate")
        return engine

    def log(self, step, metrics):
        timer.end_step(metrics["step_time_s"], metrics["rollout_time_s"])
        return real_log(self, step, metrics)

    real_make_engine, real_log = trainer.make_engine, RunLogger.log
    patch(trainer, "compute_micro_batch_logprobs", "training forward")
    patch(Accelerator, "backward", "backward")
    patch(torch.optim.AdamW, "step", "optimizer step")
    trainer.make_engine, RunLogger.log = make_engine, log
    pixels = a.image_size**2
    argv = [
        "train", f"task.name={HERE.parent / 'vs_trl.py'}:HashRewardTask", f"model.name_or_path={a.model}",
        f"model.min_pixels={pixels}", f"model.max_pixels={pixels}", f"task.options={{image_size: {a.image_size}}}",
        "task.train_data=synthetic:256", f"train.prompts_per_step={a.prompts}", f"rollout.group_size={a.group_size}",
        f"rollout.max_new_tokens={a.max_new_tokens}", "rollout.top_k=0", f"optim.micro_batch_size={a.micro_batch_size}",
        f"optim.shared_prefix={str(shared).lower()}", "optim.lr=1e-5", f"train.max_steps={a.warmup + a.steps}",
        f"train.output_dir={work / ('shared' if shared else 'per_row')}", "eval.at_end=false", "logging.progress_bar=false",
        "logging.tensorboard=false", "logging.sample_every=0", "checkpoint.save_every=0",
    ]
    try:
        trainer.train(trainer.config_from_args(build_parser("train").parse_args(argv)))
    finally:
        trainer.make_engine, RunLogger.log = real_make_engine, real_log
        for owner, name, original in reversed(patches):
            setattr(owner, name, original)
    return timer.steps[a.warmup :]


def table(title: str, steps: list[dict[str, float]]) -> str:
    order = ["rollout: generate", "scoring + grouping", "training forward", "backward", "optimizer step", "other", "step"]
    total = statistics.median(s["step"] for s in steps)
    lines = [f"{title}", "", "| stage | s/step | share |", "| --- | --- | --- |"]
    for stage in order:
        value = statistics.median(s.get(stage, 0.0) for s in steps)
        lines.append(f"| {stage} | {value:.3f} | {100 * value / total:.0f}% |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    a = p.parse_args(argv)
    from gpg_vl.tiny import make_tiny

    with tempfile.TemporaryDirectory() as tmp:
        a.model = make_tiny(Path(tmp) / a.preset, preset=a.preset, seed=0)
        for shared in (True, False):
            steps = profile(a, shared, Path(tmp))
            name = "prompt once per group (default)" if shared else "prompt once per completion (shared_prefix off)"
            print(table(f"{a.preset}, {a.image_size} px, B={a.prompts} x G={a.group_size}, {a.max_new_tokens} new tokens: {name}", steps) + "\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
