"""Format warm-up for the built-in tiny models: teach `<think>..</think><answer>..</answer>`, not the answers.

A randomly initialised policy never emits the answer format, so every group's rewards are equal and GPG
has no gradient. This short supervised stage trains on a task's prompts with a RANDOM answer of the task's
own form, `Task.warmup_answer`: by default the reference answer of another, randomly drawn example; `shapes`
(the quickstart's `builtin:tiny-warm`) draws a uniform letter. The policy learns the
format and the answer vocabulary while staying at chance accuracy. It stops when SAMPLED (T=1)
completions parse, not greedy ones: greedy parses long before samples do, and RL samples.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from gpg_vl.logprobs import compute_token_logprobs
from gpg_vl.parsing import format_ok
from gpg_vl.processor import load_processor
from gpg_vl.rollout.base import SamplingParams
from gpg_vl.rollout.hf import HFEngine

FILLERS = ("look", "see", "the shape")


def _targets(rng: random.Random, n: int, answer) -> list[str]:
    """n warm-up targets; `answer(rng)` draws the (random, so uninformative) answer of each."""
    return [f"<think>{rng.choice(FILLERS)}</think><answer>{answer(rng)}</answer>" for _ in range(n)]


def make_format_warm(
    out_dir: str | Path,
    base: str,
    seed: int = 0,
    max_steps: int = 600,
    batch_size: int = 16,
    lr: float = 2e-3,
    target_parse_rate: float = 0.95,
    check_every: int = 25,
    task: str = "shapes",
    task_options: dict | None = None,
    max_new_tokens: int = 24,
) -> Path:
    """Warm `base` up on `task`'s answer format and save it to `out_dir` (atomically). Prints progress.

    The targets' answers are `task.warmup_answer` draws over its `synthetic:512` data (a ValueError, before
    any step, for a task with no answer form). `gpg_vl.kit` calls this for the `-warm` presets."""
    from transformers import AutoModelForImageTextToText

    from gpg_vl.atomic import atomic_dir
    from gpg_vl.registry import get_task
    from gpg_vl.tiny import TINY_PIXELS

    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
    processor = load_processor(base, *TINY_PIXELS)
    task_obj = get_task(task, **(task_options or {}))
    examples = task_obj.load("synthetic:512", split="warmup")
    task_obj.configure_images(processor.budget)
    task_obj.warmup_answer(examples, random.Random(seed))  # a task with no answer form fails here, before training

    def answer(r: random.Random) -> str:
        return task_obj.warmup_answer(examples, r)
    engine = HFEngine(model, processor, batch_size=64)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    eos = processor.tokenizer.eos_token
    start, rate = time.time(), 0.0
    print(f"[warm-up] teaching the {task} answer format to {base} (stops at {target_parse_rate:.0%} sampled parse rate)")
    for step in range(1, max_steps + 1):
        batch = rng.sample(examples, batch_size)
        prompts = [processor.resize(task_obj.messages(e)) for e in batch]
        enc = processor.tokenizer([t + eos for t in _targets(rng, batch_size, answer)], return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
        logprobs = compute_token_logprobs(model, processor(prompts), enc["input_ids"], enc["attention_mask"].float(), suppressed_ids=processor.suppressed_token_ids)
        loss = -logprobs.sum() / enc["attention_mask"].sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % check_every == 0:
            probe = [task_obj.messages(e) for e in rng.sample(examples, 32)]
            texts = engine.generate(probe, SamplingParams(n=1, temperature=1.0, max_new_tokens=max_new_tokens)).texts
            rate = sum(map(format_ok, texts)) / len(texts)
            print(f"[warm-up] step {step}: loss {loss.item():.3f}, sampled parse rate {rate:.2f}")
            if rate >= target_parse_rate:
                break
    print(f"[warm-up] done in {time.time() - start:.0f}s after {step} steps (parse rate {rate:.2f})")
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return Path(out_dir)
