"""The HF engine's decode loops against each other: dynamic cache (the reference), static cache, static cache
with a compiled step (`rollout.decode`: dynamic | static | compiled).

One process, one model per preset, the three engines called in turn (dynamic, static, compiled, dynamic, ...)
so a busy minute on a shared machine hits all three; the table gives the median seconds per rollout after
the first call of each, the ratio to the dynamic loop, and the compiled loop's first call (its compile time).
Each call samples with the same seed on every engine, and the script reports whether the texts agree and the
largest log-prob difference. B prompts with one image each, G completions, T=1 with top-k off, fp32:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/decode_loop.py --presets tiny small-20m --prompts 4 \
        --group-size 8 --max-new-tokens 48 --calls 9
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

MODES = ("dynamic", "static", "compiled")


def prompts_for(n: int, size: int) -> list:
    from PIL import Image

    colours = ["red", "green", "blue", "yellow"]
    return [[{"role": "user", "content": [
        {"type": "image", "image": Image.new("RGB", (size, size), colours[i % 4])},
        {"type": "text", "text": "What colour is the large shape? Answer with a letter." + " Think." * i},
    ]}] for i in range(n)]


def bench_preset(preset: str, a) -> dict:
    from gpg_vl.config import ModelConfig
    from gpg_vl.kit import build_builtin
    from gpg_vl.modeling import load_policy
    from gpg_vl.rollout import SamplingParams
    from gpg_vl.rollout.hf import HFEngine

    pixels = a.image_size**2
    cfg = ModelConfig(name_or_path=build_builtin(f"builtin:{preset}"), dtype="float32", min_pixels=pixels, max_pixels=pixels)
    model, processor = load_policy(cfg)
    prompts = prompts_for(a.prompts, a.image_size)
    engines = {m: HFEngine(model, processor, batch_size=a.prompts * a.group_size, decode=m) for m in MODES}
    seconds = {m: [] for m in MODES}
    first, agree, worst = {}, True, 0.0
    for k in range(a.calls + 1):
        params = SamplingParams(n=a.group_size, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=a.max_new_tokens, seed=1000 + k)
        outs = {}
        for m in MODES:
            t0 = time.perf_counter()
            outs[m] = engines[m].generate(prompts, params)
            dt = time.perf_counter() - t0
            if k:
                seconds[m].append(dt)
            else:
                first[m] = dt  # the compiled engine compiles here
        for m in MODES[1:]:
            agree &= outs[m].texts == outs["dynamic"].texts
            if outs[m].logprobs.shape == outs["dynamic"].logprobs.shape:
                worst = max(worst, float((outs[m].logprobs - outs["dynamic"].logprobs).abs().max()))
            else:
                agree = False
    median = {m: statistics.median(seconds[m]) for m in MODES}
    tokens = int(outs["dynamic"].response_mask.sum())
    return {"preset": preset, "params_M": sum(p.numel() for p in model.parameters()) / 1e6, "median": median,
            "first": first, "tokens": tokens, "agree": agree, "max_logprob_diff": worst}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "small-20m"])
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--calls", type=int, default=7, help="timed calls per engine, after one first call each")
    a = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| preset | dynamic s | static s | compiled s | static / dynamic | compiled / dynamic | compiled first call s | tokens | same texts | max log-prob diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for preset in a.presets:
        r = bench_preset(preset, a)
        m = r["median"]
        print(f"| `{preset}` ({r['params_M']:.2f}M) | {m['dynamic']:.3f} | {m['static']:.3f} | {m['compiled']:.3f} | "
              f"{m['static'] / m['dynamic']:.2f} | {m['compiled'] / m['dynamic']:.2f} | {r['first']['compiled']:.1f} | "
              f"{r['tokens']} | {r['agree']} | {r['max_logprob_diff']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
