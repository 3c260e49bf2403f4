"""How close each stage of one GPG step runs to this machine's limits (a roofline per stage).

First it measures the machine, at the thread count in use: fp32 matmul GFLOPS at the shapes a step uses
(best of several `torch.mm` calls at rows x hidden x FFN of the preset) and memory bandwidth (the best of a
large copy and a large in-place update, bytes read + written, sampled before each preset and after the last:
the machine's bandwidth moves with its neighbours). Then, for each preset, one step of the trainer's own stages at the vs-TRL
settings (B prompts x G completions, 224 px, N new tokens, fp32): rollout prefill, rollout decode, training
forward, backward, optimizer step. FLOPs are counted by torch's `FlopCounterMode` (matmuls and attention);
bytes are what a decode step must read (the language model's weights, each prompt's keys/values once per group
and each completion's own; `decode_step_bytes`) and AdamW's 7 fp32 reads/writes per parameter.
A stage's limit is max(FLOPs / peak FLOPS, bytes / bandwidth); the fraction printed is limit / measured
time. Run it alone on the machine:

    .venv/bin/python benchmarks/roofline.py                   # tiny, small-20m, 2b-shape; under 15 min here
    .venv/bin/python benchmarks/roofline.py --presets tiny --out runs/roofline
    .venv/bin/python benchmarks/roofline.py --presets small-20m --decode compiled --out runs/roofline_compiled

The decode is the default loop (`rollout.decode=static`) unless `--decode` says otherwise; a compiled loop
compiles in the warm-up rollout, before anything is timed.
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
from torch.utils.flop_counter import FlopCounterMode


def best_time(fn, repeats: int = 5) -> float:
    fn()  # warm-up (allocations, thread pool)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def decode_step_bytes(model, prompts: int, group: int, prompt_length: int, steps: int) -> float:
    """What one decode step must read at least, on average over `steps`: the language model's weights (not the
    vision tower, which ran in prefill; not the embedding table, of which a step gathers one row per sequence,
    except as the LM head where the two are tied) and the keys/values attended to: each prompt's once for its
    group of completions (they are the same for all of them), each completion's own so far."""
    decoder = model.get_decoder()
    embedding, head = decoder.get_input_embeddings().weight, model.get_output_embeddings().weight
    weights = sum(p.numel() * p.element_size() for p in decoder.parameters() if p is not embedding)
    weights += head.numel() * head.element_size()
    text = model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * head.element_size()  # keys + values
    return weights + per_token * (prompts * prompt_length + prompts * group * steps / 2)


def matmul_gflops(rows: int, hidden: int, ffn: int) -> float:
    """Peak fp32 matmul GFLOPS at [rows, hidden] x [hidden, ffn] and at its transpose's shapes."""
    a, b = torch.randn(rows, hidden), torch.randn(hidden, ffn)
    c, d = torch.randn(rows, ffn), torch.randn(ffn, hidden)
    flops = 2 * rows * hidden * ffn
    return max(flops / best_time(lambda: torch.mm(a, b)), flops / best_time(lambda: torch.mm(c, d))) / 1e9


def memory_bandwidth() -> dict:
    """GB/s (bytes read + written) of a large copy (read one array, write another) and of a large in-place
    update (read and write one array, as AdamW and a cache write do). A copy alone under-counts: its
    destination is read into cache before it is written, a stream it is not credited with."""
    src = torch.empty(128 * 2**20, dtype=torch.float32).uniform_()  # 512 MiB, far beyond the 32 MiB L3
    dst = torch.empty_like(src)
    copy = 2 * src.numel() * 4 / best_time(lambda: dst.copy_(src)) / 1e9
    update = 2 * src.numel() * 4 / best_time(lambda: src.mul_(1.0)) / 1e9
    return {"copy_gb_per_s": copy, "update_gb_per_s": update}


def count_flops(fn) -> tuple[float, object]:
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return counter.get_total_flops(), out


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def step_stages(preset: str, a) -> tuple[dict, list[dict]]:
    """Time and count one step's stages on `builtin:<preset>`; returns (sizes, one row per stage)."""
    from PIL import Image

    from gpg_vl.config import ModelConfig, RolloutConfig
    from gpg_vl.kit import build_builtin
    from gpg_vl.modeling import load_policy
    from gpg_vl.prefix import compute_micro_batch_logprobs, continue_forward, prefill
    from gpg_vl.rollout import SamplingParams, make_engine

    pixels = a.image_size**2
    cfg = ModelConfig(name_or_path=build_builtin(f"builtin:{preset}"), dtype="float32", min_pixels=pixels, max_pixels=pixels)
    model, processor = load_policy(cfg)
    text = model.config.get_text_config()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    prompts = [[{"role": "user", "content": [
        {"type": "image", "image": Image.new("RGB", (a.image_size, a.image_size), c)},
        {"type": "text", "text": "What colour is the large shape? Answer with a letter."},
    ]}] for c in ["red", "green", "blue", "yellow"][: a.prompts]]
    B, G, L = len(prompts), a.group_size, a.max_new_tokens
    engine = make_engine("hf", model, processor, RolloutConfig(batch_size=B * G, max_new_tokens=L, decode=a.decode), cfg)
    params = SamplingParams(n=G, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=L, seed=0)
    engine.generate(prompts, params)  # warm-up (the compiled decode compiles here)
    model.eval()
    inputs = processor([processor.resize(p) for p in prompts])
    rows: list[dict] = []

    # rollout prefill: B prompts once (vision tower included)
    with torch.no_grad():
        flops, _ = count_flops(lambda: prefill(model, inputs, want_hidden=False))
        seconds = statistics.median(timed(lambda: prefill(model, inputs, want_hidden=False))[0] for _ in range(3))
    rows.append({"stage": "rollout prefill", "seconds": seconds, "flops": flops, "bytes": param_bytes})

    # rollout decode: the whole generate minus its prefill (medians of 3, the same seed: the same tokens each
    # time); FLOPs and bytes of one decode step x steps
    generations = [timed(lambda: engine.generate(prompts, params)) for _ in range(3)]
    gen_seconds, rollout = statistics.median(t for t, _ in generations), generations[0][1]
    steps = rollout.completion_ids.shape[1]
    with torch.no_grad():
        prefix = prefill(model, inputs, want_hidden=False)
        prefix.select(torch.arange(B).repeat_interleave(G))
        token = rollout.completion_ids[:, :1]
        mask = torch.cat([prefix.attention_mask, torch.ones(B * G, 1, dtype=prefix.attention_mask.dtype)], dim=1)
        step_flops, _ = count_flops(lambda: continue_forward(model, prefix, token, mask, 0, want_hidden=False))
    rows.append({"stage": "rollout decode", "seconds": max(gen_seconds - seconds, 1e-9), "flops": step_flops * steps,
                 "bytes": decode_step_bytes(model, B, G, inputs["input_ids"].shape[1], steps) * steps, "decode_steps": steps})

    # training forward + backward + optimizer, as the trainer runs them (shared prefix, one micro-batch)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6, fused=True)
    ids, row_mask = rollout.completion_ids, rollout.response_mask

    def forward():
        return compute_micro_batch_logprobs(model, processor, prompts, rollout.prompt_indices, ids, row_mask, 1.0, True)

    forward().sum().backward()  # warm-up, and the optimizer's state exists after one step
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as fwd_counter:
        logprobs = forward()
    with FlopCounterMode(display=False) as bwd_counter:
        (logprobs * row_mask).sum().backward()
    optimizer.zero_grad(set_to_none=True)
    # the best of 3 forward + backward pairs, each graph freed by its backward before the next forward (a single
    # forward timed while an earlier graph was still alive measured 4-5x slower at small-20m)
    seconds_fwd = seconds_bwd = float("inf")
    for _ in range(3):
        t_fwd, logprobs = timed(forward)
        t_bwd, _ = timed(lambda: (logprobs * row_mask).sum().backward())
        optimizer.zero_grad(set_to_none=True)
        seconds_fwd, seconds_bwd = min(seconds_fwd, t_fwd), min(seconds_bwd, t_bwd)
    (forward() * row_mask).sum().backward()  # gradients for the optimizer step timed below
    rows.append({"stage": "training forward", "seconds": seconds_fwd, "flops": fwd_counter.get_total_flops(), "bytes": param_bytes})
    rows.append({"stage": "backward", "seconds": seconds_bwd, "flops": bwd_counter.get_total_flops(), "bytes": 2 * param_bytes})
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    seconds_opt = statistics.median(timed(optimizer.step)[0] for _ in range(3))
    rows.append({"stage": "optimizer", "seconds": seconds_opt, "flops": 0.0, "bytes": 7 * 4 * trainable})
    sizes = {"preset": preset, "hidden": text.hidden_size, "ffn": text.intermediate_size, "parameters_M": trainable / 1e6}
    return sizes, rows


def roofline(rows: list[dict], limits: dict) -> list[dict]:
    peak, bw = limits["matmul_gflops"] * 1e9, limits["memory_gb_per_s"] * 1e9
    for r in rows:
        compute, memory = r["flops"] / peak, r["bytes"] / bw
        r["bound"] = "compute" if compute >= memory else "memory"
        r["limit_seconds"] = max(compute, memory)
        r["compute_seconds"], r["memory_seconds"] = compute, memory
        r["fraction"] = r["limit_seconds"] / r["seconds"]
        r["gflops"] = r["flops"] / r["seconds"] / 1e9
        r["gb_per_s"] = r["bytes"] / r["seconds"] / 1e9
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "small-20m", "2b-shape"])
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: as configured)")
    ap.add_argument("--decode", default="static", choices=["dynamic", "static", "compiled"], help="the HF engine's decode loop (rollout.decode)")
    ap.add_argument("--out", default="runs/roofline")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from gpg_vl.tiny import PRESETS

    # This machine's memory bandwidth moves with its neighbours (a run measured 44-98 GB/s for the same update):
    # it is sampled before each preset and once after the last, and the limit is the best sample, so that no
    # stage is held to a bandwidth the machine was not giving at that moment
    results, samples = [], []
    for preset in a.presets:
        p = PRESETS[preset]
        rows_tokens = a.prompts * a.group_size * (a.max_new_tokens + 80)  # the training forward's rows x tokens
        samples.append(memory_bandwidth())
        shape = [min(rows_tokens, 4096), p.hidden, p.ffn]
        limits = {"matmul_gflops": matmul_gflops(*shape), "matmul_shape": shape}
        sizes, rows = step_stages(preset, a)
        results.append({**sizes, "limits": limits, "stages": rows})
    samples.append(memory_bandwidth())
    bandwidth = max(max(b.values()) for b in samples)
    print(f"memory bandwidth {bandwidth:.1f} GB/s, the best of {len(samples)} samples (copy "
          f"{min(b['copy_gb_per_s'] for b in samples):.1f}-{max(b['copy_gb_per_s'] for b in samples):.1f}, in-place update "
          f"{min(b['update_gb_per_s'] for b in samples):.1f}-{max(b['update_gb_per_s'] for b in samples):.1f}); "
          f"{torch.get_num_threads()} threads")
    for result in results:
        limits = result["limits"]
        limits["memory_gb_per_s"] = bandwidth
        rows = roofline(result["stages"], limits)
        print(f"{result['preset']} ({result['parameters_M']:.2f}M): peak {limits['matmul_gflops']:.0f} GFLOPS at {limits['matmul_shape']}")
        for r in rows:
            print(f"  {r['stage']:17s} {r['seconds']:8.3f} s  {r['gflops']:7.1f} GFLOPS  {r['gb_per_s']:6.1f} GB/s  "
                  f"{r['bound']:7s}-bound limit {r['limit_seconds']:.3f} s  = {100 * r['fraction']:5.1f}% of the limit  "
                  f"({r['seconds'] / r['memory_seconds']:.1f}x the memory-traffic limit {r['memory_seconds']:.3f} s)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": str(date.today()), "machine": platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "args": vars(a), "bandwidth_samples": samples}
    (out / "roofline.json").write_text(json.dumps({"meta": meta, "presets": results}, indent=1))


if __name__ == "__main__":
    main()
