"""The HF engine against vLLM's CPU build at equal work: seconds per rollout and completion tokens per second.

Both engines sample from the same weights (a `builtin:` preset with random weights, so completions rarely end
early), the same B prompts with one 224x224 image each, G completions per prompt, `--max-new-tokens` new
tokens, T=1 with top-k off, fp32, in ONE process of `.venv-vllm` (the HF engine runs there too, so both use
the same torch), engines alternating call by call; the table shows medians after warm-up calls. Run it alone
on the machine (docs/performance.md):

    make setup-vllm
    .venv-vllm/bin/python benchmarks/rollout_engines.py --presets tiny-h32 small-20m --image-size 224 \
        --prompts 4 --group-size 8 --max-new-tokens 48 --warmup 2 --calls 5 --out runs/rollout_engines
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch


def time_engine(engine, prompts, params, warmup: int, calls: int) -> dict:
    from gpg_vl.rollout import SamplingParams

    seconds, tokens = [], []
    for k in range(warmup + calls):
        p = SamplingParams(**{**params.__dict__, "seed": 1000 + k})
        t0 = time.perf_counter()
        r = engine.generate(prompts, p)
        if k >= warmup:
            seconds.append(time.perf_counter() - t0)
            tokens.append(int(r.response_mask.sum()))
    s = statistics.median(seconds)
    return {"s_per_rollout": s, "tokens": statistics.median(tokens), "tokens_per_s": statistics.median(tokens) / s}


def bench_preset(preset: str, a) -> dict:
    from PIL import Image

    from gpg_vl.config import ModelConfig, RolloutConfig
    from gpg_vl.kit import build_builtin
    from gpg_vl.modeling import load_policy
    from gpg_vl.rollout import SamplingParams, make_engine

    pixels = a.image_size**2
    cfg = ModelConfig(name_or_path=build_builtin(f"builtin:{preset}"), dtype="float32", min_pixels=pixels, max_pixels=pixels)
    model, processor = load_policy(cfg)
    colours = ["red", "green", "blue", "yellow"]
    prompts = [[{"role": "user", "content": [
        {"type": "image", "image": Image.new("RGB", (a.image_size, a.image_size), colours[i % 4])},
        {"type": "text", "text": "What colour is the large shape? Answer with a letter."},
    ]}] for i in range(a.prompts)]
    params = SamplingParams(n=a.group_size, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=a.max_new_tokens)
    rollout_cfg = RolloutConfig(batch_size=a.prompts * a.group_size, max_new_tokens=a.max_new_tokens)
    engines = {name: make_engine(name, model, processor, rollout_cfg, cfg) for name in ("hf", "vllm")}
    torch.set_num_threads(a.threads)
    results = {name: [] for name in engines}
    for _ in range(a.rounds):  # alternate, so a slow minute hits both
        for name, engine in engines.items():
            results[name].append(time_engine(engine, prompts, params, a.warmup, a.calls))
    row = {"preset": preset, "parameters_M": sum(p.numel() for p in model.parameters()) / 1e6}
    for name, runs in results.items():
        row[name] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    row["speedup_vllm"] = row["hf"]["s_per_rollout"] / row["vllm"]["s_per_rollout"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny-h32", "small-20m"])
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/rollout_engines")
    a = ap.parse_args()
    import vllm

    rows = [bench_preset(p, a) for p in a.presets]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": str(date.today()), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "torch": torch.__version__, "vllm": vllm.__version__, "args": vars(a)}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["| preset | HF s/rollout | vLLM s/rollout | HF tokens/s | vLLM tokens/s | vLLM speed-up |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| `{r['preset']}` ({r['parameters_M']:.2f}M) | {r['hf']['s_per_rollout']:.3f} | {r['vllm']['s_per_rollout']:.3f} | "
                     f"{r['hf']['tokens_per_s']:.0f} | {r['vllm']['tokens_per_s']:.0f} | {r['speedup_vllm']:.2f}x |")
    table = "\n".join(lines)
    (out / "results.md").write_text(f"{table}\n\n{json.dumps(meta)}\n")
    print(table)


if __name__ == "__main__":
    main()
