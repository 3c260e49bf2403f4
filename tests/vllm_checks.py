"""Checks of the vLLM engine against the real vLLM, run by tests/test_vllm_engine.py INSIDE `.venv-vllm`.

Not a test file (pytest does not collect it): the main suite's interpreter has no vLLM, so it runs
`.venv-vllm/bin/python tests/vllm_checks.py ARCH OUT.json` and asserts on the figures this writes. One
process per model family, since each builds one in-process engine (~15-40 s on 2 CPU cores).
"""

from __future__ import annotations

import json
import sys

import torch
from PIL import Image

from gpg_vl.config import LoraConfig, ModelConfig, RolloutConfig
from gpg_vl.kit import build_builtin
from gpg_vl.logprobs import compute_token_logprobs
from gpg_vl.modeling import load_policy
from gpg_vl.rollout import SamplingParams, make_engine
from gpg_vl.rollout.vllm import build_requests, check_prompt_parity

# sizes and aspect ratios on both sides of the tiny budget (56*56 .. 112*112 px), one prompt with two images
IMAGE_SIZES = [[(56, 56)], [(200, 40)], [(90, 130)], [(300, 300)], [(33, 77)], [(120, 60), (40, 100)]]


def prompt(sizes, seed):
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    images = [{"type": "image", "image": Image.new("RGB", s, colours[(seed + k) % 6])} for k, s in enumerate(sizes)]
    return [{"role": "user", "content": [*images, {"type": "text", "text": f"What colour is image {seed}?"}]}]


def teacher_forced(model, processor, prompts, rollout) -> torch.Tensor:
    """The HF engine's scoring of vLLM's samples: the training forward's log-probs of the same tokens."""
    batch = [processor.resize(prompts[i]) for i in rollout.prompt_indices]
    with torch.no_grad():
        return compute_token_logprobs(model, processor(batch), rollout.completion_ids, rollout.response_mask, 1.0, processor.suppressed_token_ids)


def logprob_gap(model, processor, engine, prompts, seed, old_state=None) -> dict:
    """Max |vLLM - HF| over sampled tokens; with `old_state`, also the mean gap to the weights before the sync,
    which must be large (vLLM follows the sync) while the first is ~0."""
    r = engine.generate(prompts, SamplingParams(n=3, max_new_tokens=12, seed=seed))
    mask = r.response_mask.bool()
    gap = {"max_abs": float((r.logprobs - teacher_forced(model, processor, prompts, r))[mask].abs().max()),
           "mean_logprob": float(r.logprobs[mask].mean())}
    if old_state is not None:
        new_state = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(old_state)
        gap["mean_abs_to_old_weights"] = float((r.logprobs - teacher_forced(model, processor, prompts, r))[mask].abs().mean())
        model.load_state_dict(new_state)
    return gap


def main(arch: str, out: str) -> None:
    torch.manual_seed(0)
    lora = LoraConfig(r=4, alpha=8) if arch == "lora" else LoraConfig()
    name = "builtin:tiny-h32" if arch in ("qwen2_vl", "lora") else f"builtin:tiny-h32-{arch}"
    cfg = ModelConfig(name_or_path=build_builtin(name), dtype="float32", lora=lora)
    model, processor = load_policy(cfg)
    # building the engine must leave the trainer's generators and thread count as they were
    set_num_threads = torch.set_num_threads
    torch.set_num_threads(2)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    engine = make_engine("vllm", model, processor, RolloutConfig(batch_size=32, max_new_tokens=16, vllm_max_images_per_prompt=2), cfg)
    report: dict = {
        "arch": arch,
        "rng_untouched": torch.equal(torch.rand(3), expected),
        "threads_after_engine": torch.get_num_threads(),
        "set_num_threads_restored": torch.set_num_threads is set_num_threads,
    }
    prompts = [prompt(sizes, k) for k, sizes in enumerate(IMAGE_SIZES)]

    # 1. prompt ids: what vLLM built from each image against what the HF processor builds
    outputs = engine.llm.generate(
        build_requests(processor, prompts, 2),
        sampling_params=engine._sampling_params(max_tokens=1, temperature=0.0), use_tqdm=False,
    )
    rows = []
    for p, o in zip(prompts, outputs):
        enc = processor([processor.resize(p)])
        hf = enc["input_ids"][0][enc["attention_mask"][0].bool()].tolist()
        rows.append({"hf_len": len(hf), "vllm_len": len(o.prompt_token_ids), "hf_image_tokens": hf.count(processor.image_token_id),
                     "vllm_image_tokens": list(o.prompt_token_ids).count(processor.image_token_id), "equal": hf == list(o.prompt_token_ids)})
    report["prompts"] = rows
    check_prompt_parity(processor, prompts, [o.prompt_token_ids for o in outputs])  # raises on any difference

    # 2. sampled-token log-probs against the HF teacher-forced ones, before and after syncs
    gaps = {"initial": logprob_gap(model, processor, engine, prompts, 1)}
    with torch.no_grad():
        old = {k: v.clone() for k, v in model.state_dict().items()}
        if arch == "lora":  # adapters that change the function; vLLM gets the merged weights
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.3)
            engine.sync_weights(model)
            gaps["lora_merged"] = logprob_gap(model, processor, engine, prompts, 2, old)
        else:
            emb = model.get_input_embeddings().weight  # tied to the LM head: the stale-packed-head trap
            emb.add_(0.05 * torch.randn_like(emb))
            engine.sync_weights(model)
            gaps["after_embedding_sync"] = logprob_gap(model, processor, engine, prompts, 2, old)
            old = {k: v.clone() for k, v in model.state_dict().items()}
            for n, p in model.named_parameters():  # every other tensor, vision tower included
                if "embed_tokens" not in n:
                    p.add_(0.05 * torch.randn_like(p))
            engine.sync_weights(model)
            gaps["after_full_sync"] = logprob_gap(model, processor, engine, prompts, 3, old)
            engine.sync_weights(model)  # a sync with nothing changed changes nothing
            gaps["after_repeat_sync"] = logprob_gap(model, processor, engine, prompts, 4)
    report["logprob_max_abs_gap"] = gaps
    # the same prompts sampled twice with one seed give the same completions (per-request seeds)
    a = engine.generate(prompts[:2], SamplingParams(n=2, max_new_tokens=8, seed=11))
    b = engine.generate(prompts[:2], SamplingParams(n=2, max_new_tokens=8, seed=11))
    report["seeded_repeat_equal"] = a.texts == b.texts and torch.equal(a.completion_ids, b.completion_ids)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
