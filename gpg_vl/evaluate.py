"""`gpg-vl eval`: score one or more checkpoints on a task with the task's own metrics, and compare them.

Run: `gpg-vl eval --task shapes --model builtin:tiny-warm --model runs/gpg/checkpoint-200 --output evals/`.
Each model gets `DIR/<name>/` with records.jsonl (one line per example, appended per batch, so a rerun
resumes where an interrupted one stopped), summary.json (what `task.metrics` returns, keys verbatim) and
summary.md; several models also get DIR/comparison.md and DIR/comparison.png. `evaluate_completions` is the
same generation loop without files, for the trainer's periodic held-out evaluation.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpg_vl.checkpoint import atomic_write_text
from gpg_vl.config import ConfigError, ModelConfig, RolloutConfig, parse_override
from gpg_vl.data import DataError
from gpg_vl.task import RewardOutput, Task

if TYPE_CHECKING:
    from gpg_vl.rollout import RolloutEngine, SamplingParams

RECORDS, SUMMARY_JSON, SUMMARY_MD, RUN_JSON = "records.jsonl", "summary.json", "summary.md", "run.json"
COMPARISON_MD, COMPARISON_PNG = "comparison.md", "comparison.png"

# When a record counts as correct, read from the task's reward components (the first key present decides):
# multiple-choice, math and classification tasks report `accuracy` (1.0 when right); grounding tasks report
# `iou`, correct above 0.5 (the acc@0.5 rule). A task with neither gets `correct: null` and no pass@k.
CORRECT_RULES = (("accuracy", lambda v: v >= 1.0), ("iou", lambda v: v > 0.5))

# Folder names that say nothing on their own; the model is then named by its run folder too (run-checkpoint-100).
_GENERIC_NAME = re.compile(r"(checkpoint|step|global_step|epoch|iter)[-_]?\d+|final|best|latest|last|model|hf", re.I)


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    default_tokens = RolloutConfig().max_new_tokens
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "example:\n  gpg-vl eval --task shapes --model builtin:tiny-warm --model runs/gpg/checkpoint-200 --output evals/\n"
        "Rerun the same command to resume an interrupted eval; records already written are kept."
    )
    add = parser.add_argument
    add("--task", required=True, help="task name (see `gpg-vl tasks`), pkg.module:Class or file.py:Class")
    add("--model", action="append", required=True, metavar="PATH_OR_ID",
        help="checkpoint folder, hub id or builtin:<preset>; repeat to compare models")
    add("--output", required=True, metavar="DIR", help="DIR/<model name>/ gets records.jsonl, summary.json, summary.md")
    add("--data", metavar="PATH_OR_ID", help="hub id, or local file or folder in the task's schema (default: the task's)")
    add("--split", help="dataset split (default: the task's evaluation split, usually test)")
    add("--limit", type=int, metavar="N", help="evaluate the first N examples only")
    add("--batch-size", type=int, default=32, metavar="N", help="prompts per batch; records are saved after each (default: 32)")
    add("--task-option", action="append", default=[], metavar="KEY=VALUE",
        help="task constructor option, the value read as YAML (repeatable), e.g. prompt_style=base")
    add("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy decoding (default: 0)")
    add("--num-samples", type=int, default=1, metavar="N",
        help="completions per example; N > 1 adds pass@k for k = 1, 2, 4, ..., N (needs --temperature > 0)")
    add("--max-new-tokens", type=int, default=default_tokens, help=f"longest completion (default: {default_tokens}, as in training)")
    add("--min-pixels", type=int, help="smallest image area fed to the model (default: the one saved with the model)")
    add("--max-pixels", type=int, help="largest image area fed to the model (default: the one saved with the model)")
    add("--engine", default="hf", help="rollout engine: hf (transformers generate) | vllm (CUDA only) (default: hf)")
    add("--seed", type=int, default=0, help="sampling seed (default: 0)")
    add("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
        help="weights dtype; auto is bfloat16 on CUDA, float32 on the CPU")


# ---- generation, shared with the trainer ---------------------------------------------------------------


@dataclass
class Generated:
    """What the model produced for one example."""

    prompt: str  # the text of the chat messages, each image shown as <image>
    completions: list[str]  # [n] sampled completions; [] when the prompt could not be built
    error: str | None = None  # why the prompt could not be built (missing or unreadable image)


def generate_batch(task: Task, engine: RolloutEngine, examples: Sequence[dict], sampling: SamplingParams) -> list[Generated]:
    """`sampling.n` completions per example; an example whose images cannot be read gets an error instead."""
    from gpg_vl.images import message_images, smart_resize

    prompts, out = [], []
    for example in examples:
        try:
            messages = task.messages(example)
            for image in message_images(messages):  # fail here, on this example, not inside the engine's batch
                try:
                    smart_resize(image.height, image.width, task.min_pixels, task.max_pixels)
                except ValueError as e:
                    raise DataError(f"example {example.get('id', '?')}: unusable image: {e}") from None
        except DataError as e:
            out.append(Generated("", [], str(e)))
            continue
        prompts.append(messages)
        out.append(Generated(prompt_text(messages), []))
    texts = engine.generate(prompts, sampling).texts if prompts else []  # [len(prompts) * n], group-contiguous
    if len(texts) != len(prompts) * sampling.n:
        raise RuntimeError(f"engine gave {len(texts)} completions for {len(prompts)} prompts x {sampling.n} samples")
    ok = iter([g for g in out if g.error is None])
    for i in range(0, len(texts), sampling.n):
        next(ok).completions = list(texts[i : i + sampling.n])
    return out


def prompt_text(messages: list[dict]) -> str:
    """The text of chat messages, one line per text item, `<image>` where an image goes."""
    parts = []
    for message in messages:
        content = message.get("content")
        items = content if isinstance(content, list) else [{"type": "text", "text": str(content)}]
        parts += ["<image>" if item.get("type") == "image" else str(item.get("text", "")) for item in items]
    return "\n".join(parts)


def compute_metrics(task: Task, examples: Sequence[dict], samples: Sequence[Sequence[str]]) -> dict[str, float]:
    """`task.metrics` over every sample of every example (the mean over samples); examples without samples
    (unreadable images) are left out. With one sample each this is exactly `task.metrics(examples, completions)`.
    """
    kept = [(example, texts) for example, texts in zip(examples, samples) if texts]
    if not kept:
        return {}
    return task.metrics([e for e, texts in kept for _ in texts], [c for _, texts in kept for c in texts])


def evaluate_completions(
    task: Task, engine: RolloutEngine, examples: Sequence[dict], sampling: SamplingParams, batch_size: int
) -> tuple[list[str], dict[str, float]]:
    """Generate for `examples` in batches of `batch_size` prompts; (first completion per example, metrics).

    Examples whose images cannot be read get "" and are left out of the metrics (a warning says how many).
    """
    generated: list[Generated] = []
    for start in range(0, len(examples), max(1, batch_size)):
        generated += generate_batch(task, engine, examples[start : start + batch_size], sampling)
    errors = [g.error for g in generated if g.error is not None]
    if errors:
        print(f"warning: {len(errors)} of {len(examples)} examples skipped; first: {errors[0]}", file=sys.stderr)
    metrics = compute_metrics(task, examples, [g.completions for g in generated])
    return [g.completions[0] if g.completions else "" for g in generated], metrics


# ---- scoring records ------------------------------------------------------------------------------------


def is_correct(reward: RewardOutput) -> bool | None:
    """Correct or not by `CORRECT_RULES`; None when the task reports neither accuracy nor iou."""
    for key, rule in CORRECT_RULES:
        if key in reward.components:
            return bool(rule(reward.components[key]))
    return None


def make_record(task: Task, example: dict, example_id: str, generated: Generated) -> dict[str, Any]:
    """One records.jsonl line: our fields first, then the task's (`task.record_fields`) unless they clash."""
    if generated.error is not None:
        ours: dict[str, Any] = {"id": example_id, "prompt": "", "completion": "", "error": generated.error}
    else:
        rewards = [task.score(c, example) for c in generated.completions]
        correct = [is_correct(r) for r in rewards]
        first = generated.completions[0]
        ours = {
            "id": example_id,
            "prompt": generated.prompt,
            "completion": first,
            "parsed_answer": task.parse_answer(first),
            "reward": rewards[0].total,
            "reward_components": rewards[0].components,
            "correct": correct[0],
        }
        if len(generated.completions) > 1:
            ours["completions"] = generated.completions
            ours["num_correct"] = None if None in correct else sum(correct)
    fields = task.record_fields(example)
    return {**ours, **{k: v for k, v in fields.items() if k not in ours}}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"): the chance that
    k of the n samples, drawn without replacement, include at least one of the c correct ones,
    1 - C(n-c, k) / C(n, k).
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_at_k_metrics(counts: Sequence[tuple[int, int]]) -> dict[str, float]:
    """Mean pass@k over examples given (n, c) per example, for k = 1, 2, 4, ... up to n, and n itself."""
    n = min(total for total, _ in counts)
    ks = sorted({2**i for i in range(n.bit_length()) if 2**i <= n} | {n})
    return {f"pass@{k}": sum(pass_at_k(total, c, k) for total, c in counts) / len(counts) for k in ks}


# ---- records on disk --------------------------------------------------------------------------------------


def load_records(path: Path) -> list[dict]:
    """The records an earlier run wrote. A last line cut short by a crash is dropped (from the file too, so
    appends start on a fresh line)."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    end = raw.rfind(b"\n") + 1
    if end < len(raw):
        with open(path, "r+b") as f:
            f.truncate(end)
    return [json.loads(line) for line in raw[:end].decode("utf-8").splitlines() if line.strip()]


def append_records(path: Path, records: Sequence[dict]) -> None:
    """Append and fsync, so a batch is on disk before the next one starts."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def example_ids(task: Task, examples: Sequence[dict]) -> list[str]:
    """`task.example_id` of each example, made unique with `#k` (RefCOCO has several expressions per image)."""
    used: set[str] = set()
    ids = []
    for index, example in enumerate(examples):
        base = candidate = task.example_id(example, index)
        k = 1
        while candidate in used:
            candidate, k = f"{base}#{k}", k + 1
        used.add(candidate)
        ids.append(candidate)
    return ids


# ---- naming and setup -------------------------------------------------------------------------------------


def model_name(name_or_path: str) -> str:
    """A folder name for a model: `builtin-tiny`, `Qwen2-VL-2B-Instruct`, `run-checkpoint-100` (generic last
    folders such as checkpoint-N keep their run folder's name in front)."""
    if name_or_path.startswith("builtin:"):
        parts = ["builtin", name_or_path.split(":", 1)[1]]
    else:
        local = Path(name_or_path).expanduser()
        parts = [p for p in (local.resolve() if local.exists() else local).parts if p not in ("/", "\\", ".", "")]
    parts = parts or ["model"]
    keep = 2 if len(parts) > 1 and (_GENERIC_NAME.fullmatch(parts[-1]) or parts[0] == "builtin") else 1
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts[-keep:])).strip("._") or "model"
    return name


def unique_model_names(models: Sequence[str]) -> list[str]:
    names: list[str] = []
    for model in models:
        base = name = model_name(model)
        k = 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def pixel_budget(path: str, min_pixels: int | None, max_pixels: int | None) -> tuple[int, int]:
    """The image budget the model will run with: the flags where given, else the one saved with the model
    (read by `load_processor`, the same rule `load_policy` applies), without loading any weights."""
    from gpg_vl.modeling import ModelLoadError, check_model_source, load_processor

    if path.startswith((".", "/", "~")) and not Path(path).expanduser().exists():
        raise ModelLoadError(f"model folder not found: {path}")
    try:
        local_only = check_model_source(path)  # fails fast when a hub id is neither reachable nor cached
        processor = load_processor(path, min_pixels, max_pixels, local_files_only=local_only)
    except ModelLoadError:
        raise
    except Exception as e:
        first_line = (str(e).splitlines() or [""])[0][:300]
        raise ModelLoadError(f"could not load the processor of {path!r}: {type(e).__name__}: {first_line}") from None
    return processor.min_pixels, processor.max_pixels


def make_task(name: str, options: dict) -> Task:
    from gpg_vl.registry import get_task

    try:
        return get_task(name, **options)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"--task {name}: {e.args[0] if e.args else e}") from None


def check_args(args) -> None:
    from gpg_vl.rollout import ENGINES

    if args.engine not in ENGINES:
        raise ConfigError(f"--engine {args.engine!r} is unknown; choose one of {', '.join(ENGINES)}")
    if args.engine == "vllm" and importlib.util.find_spec("vllm") is None:  # say so once, not once per model
        raise ConfigError("--engine vllm needs vLLM, which is not installed: `pip install 'gpg-vl[vllm]'` on a CUDA machine")
    if args.num_samples < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        raise ConfigError("--num-samples, --batch-size and --max-new-tokens must be >= 1")
    if args.limit is not None and args.limit < 1:
        raise ConfigError("--limit must be >= 1")
    if args.num_samples > 1 and args.temperature <= 0:
        raise ConfigError("--num-samples > 1 needs --temperature > 0: greedy decoding gives the same completion every time")


# ---- the verb ---------------------------------------------------------------------------------------------


@dataclass
class EvalData:
    """The task, its examples (after --limit) and their unique ids: loaded once, shared by every model."""

    task: Task
    examples: Sequence[dict]
    ids: list[str]


def run(args) -> int:
    """Evaluate every --model in turn; 0 when all were evaluated, 1 when any failed (the others still are)."""
    from gpg_vl.modeling import ModelLoadError, resolve_model_path
    from gpg_vl.rollout import SamplingParams

    check_args(args)
    options = dict(parse_override(text) for text in args.task_option)
    task = make_task(args.task, options)
    data_path = args.data or task.default_eval_data
    split = args.split or task.default_eval_split
    examples = task.load(data_path, split)  # a DataError stops here, before any model is loaded
    examples = examples if args.limit is None else examples[: args.limit]
    data = EvalData(task, examples, example_ids(task, examples))
    sampling = SamplingParams(
        n=args.num_samples, temperature=args.temperature, top_p=1.0, top_k=0, max_new_tokens=args.max_new_tokens, seed=args.seed
    )
    output = Path(args.output)
    results: dict[str, dict] = {}
    failures: dict[str, str] = {}
    for name, model in zip(unique_model_names(args.model), args.model):
        try:
            path = resolve_model_path(model)  # builds a builtin preset on first use
            # the budget each checkpoint was trained with: builtin tiny models 56x56..112x112, Qwen2-VL its own
            budget = pixel_budget(path, args.min_pixels, args.max_pixels)
        except ModelLoadError as e:
            failures[name] = _report_failure(model, name, e)
            continue
        task.configure_images(*budget)  # before any message is built or completion scored for this model
        local = Path(model).expanduser()
        settings = {  # what must match for a rerun to resume into the same records
            "model": str(local.resolve()) if local.exists() else model,
            "task": args.task, "task_options": options, "data": data_path, "split": split,
            "temperature": args.temperature, "num_samples": args.num_samples, "max_new_tokens": args.max_new_tokens,
            "min_pixels": budget[0], "max_pixels": budget[1], "seed": args.seed if args.temperature > 0 else None,
        }  # fmt: skip
        try:
            results[name] = evaluate_model(name, path, output / name, data, settings, sampling, args)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # one broken model must not stop the comparison of the others
            expected = isinstance(e, (ModelLoadError, ConfigError, DataError, ImportError))  # others get a traceback
            failures[name] = _report_failure(model, name, e, tb=not expected)
    if len(args.model) > 1 and results:
        header = f"Task `{args.task}` on `{data_path}` (split `{split}`)"
        atomic_write_text(output / COMPARISON_MD, render_comparison(results, failures, header))
        plot_comparison(output / COMPARISON_PNG, results, f"{args.task} ({data_path}, {split})")
        print(f"\ncomparison: {output / COMPARISON_MD}, {output / COMPARISON_PNG}")
    if failures:
        print(f"gpg-vl eval: {len(failures)} of {len(args.model)} models not evaluated: {', '.join(failures)}", file=sys.stderr)
    return 1 if failures else 0


def _report_failure(model: str, name: str, error: BaseException, tb: bool = False) -> str:
    if tb:
        traceback.print_exception(error, file=sys.stderr)
    message = f"{type(error).__name__}: {error}" if tb else str(error)
    print(f"gpg-vl eval: model {model!r} ({name}) was not evaluated: {message}", file=sys.stderr)
    return message


def evaluate_model(name: str, path: str, folder: Path, data: EvalData, settings: dict, sampling: SamplingParams, args) -> dict:
    """Generate for the examples that folder/records.jsonl lacks, then write the summary over all of them."""
    records_path = folder / RECORDS
    settings = json.loads(json.dumps(settings, default=str))  # as it reads back, so the resume check compares like with like
    previous = load_records(records_path)
    if previous and (folder / RUN_JSON).exists():
        earlier = json.loads((folder / RUN_JSON).read_text()).get("settings", {})
        changed = [f"{k}: {earlier.get(k)!r} -> {settings.get(k)!r}" for k in sorted(settings.keys() | earlier.keys())
                   if settings.get(k) != earlier.get(k)]  # fmt: skip
        if changed:
            raise ConfigError(f"{folder} holds records made with other settings ({'; '.join(changed)}); "
                              "use another --output or delete that folder")  # fmt: skip
    if any("error" in r for r in previous):  # examples that failed before are retried (the image may be fixed)
        previous = [r for r in previous if "error" not in r]
        atomic_write_text(records_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in previous))
    done = {r["id"]: r for r in previous}
    pending = [i for i, example_id in enumerate(data.ids) if example_id not in done]
    if pending:
        engine = load_engine(path, settings, args)  # only now: a finished eval re-summarises without the model
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / RUN_JSON, json.dumps({"settings": settings}, indent=2) + "\n")
        _generate_records(name, engine, data, pending, done, records_path, sampling, args.batch_size)
        del engine
        _free_memory()
    else:
        print(f"{name}: all {len(data.ids)} examples already in {records_path}; recomputing the summary")
    return write_summary(name, folder, data, [done[i] for i in data.ids], settings)


def load_engine(path: str, settings: dict, args) -> RolloutEngine:
    import torch

    from gpg_vl.modeling import load_policy
    from gpg_vl.rollout import make_engine

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_cfg = ModelConfig(path, dtype=args.dtype, min_pixels=settings["min_pixels"], max_pixels=settings["max_pixels"])
    # one generate call per batch: the engine's batch is prompts per batch x samples per prompt
    rollout_cfg = RolloutConfig(engine=args.engine, batch_size=args.batch_size * args.num_samples,
                                max_new_tokens=args.max_new_tokens, temperature=args.temperature)  # fmt: skip
    model, processor = load_policy(model_cfg, device)
    return make_engine(args.engine, model, processor, rollout_cfg, model_cfg)


def _generate_records(name: str, engine, data: EvalData, pending: list[int], done: dict, path: Path, sampling, batch_size: int):
    from tqdm import tqdm

    total = len(data.ids)
    with tqdm(total=total, initial=total - len(pending), unit="ex", desc=name, dynamic_ncols=True) as bar:
        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            # seeded by the batch's first example: a run resumed at a batch boundary samples what an unbroken one would
            params = dataclasses.replace(sampling, seed=sampling.seed + batch[0]) if sampling.seed is not None else sampling
            generated = generate_batch(data.task, engine, [data.examples[i] for i in batch], params)
            records = [make_record(data.task, data.examples[i], data.ids[i], g) for i, g in zip(batch, generated)]
            append_records(path, records)
            done.update({r["id"]: r for r in records})
            bar.update(len(batch))


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- summaries and the comparison ---------------------------------------------------------------------------


def write_summary(name: str, folder: Path, data: EvalData, records: list[dict], settings: dict) -> dict:
    """summary.json (the task's metrics, plus pass@k with several samples), summary.md and run.json's counts."""
    samples = [[] if "error" in r else r.get("completions", [r["completion"]]) for r in records]
    metrics = compute_metrics(data.task, data.examples, samples)
    scored = [r for r in records if "error" not in r]
    counts = [(len(s), r.get("num_correct")) for s, r in zip(samples, records) if s]
    if settings["num_samples"] > 1 and counts and all(c is not None for _, c in counts):
        metrics.update(pass_at_k_metrics(counts))
    errors = [r for r in records if "error" in r]
    info = {"examples": len(scored), "errors": len(errors)}
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / SUMMARY_JSON, json.dumps(metrics, indent=2) + "\n")
    run_info = {"settings": settings, **info, "error_ids": [r["id"] for r in errors]}
    atomic_write_text(folder / RUN_JSON, json.dumps(run_info, indent=2) + "\n")
    markdown = render_summary(name, settings, metrics, info)
    atomic_write_text(folder / SUMMARY_MD, markdown)
    print(f"\n{markdown}\nwritten to {folder}/ ({RECORDS}, {SUMMARY_JSON}, {SUMMARY_MD})")
    if errors:
        print(
            f"warning: {name}: {len(errors)} of {len(records)} examples could not be shown to the model and are left out "
            f"of the metrics (error records in {folder / RECORDS}; they are retried on the next run). First: {errors[0]['error']}",
            file=sys.stderr,
        )
    return {"metrics": metrics, **info}


def format_value(value: float) -> str:
    """Fractions in [0, 1] as percentages (the way papers report them); anything else as a plain number."""
    if isinstance(value, (int, float)) and 0.0 <= value <= 1.0:
        return f"{100 * value:.1f}%"
    return f"{value:.4g}" if isinstance(value, (int, float)) else str(value)


def render_summary(name: str, settings: dict, metrics: dict[str, float], info: dict) -> str:
    decoding = "greedy" if settings["temperature"] <= 0 else f"T={settings['temperature']}, {settings['num_samples']} samples"
    lines = [
        f"# {name}",
        "",
        f"`{settings['model']}` on task `{settings['task']}` (`{settings['data']}`, split `{settings['split']}`), {decoding}: "
        f"{info['examples']} examples" + (f", {info['errors']} skipped (unreadable images)" if info["errors"] else ""),
        "",
        "| metric | value |",
        "| --- | ---: |",
        *(f"| {key} | {format_value(value)} |" for key, value in metrics.items()),
    ]
    return "\n".join(lines) + "\n"


def _metric_keys(results: dict[str, dict]) -> list[str]:
    keys: list[str] = []
    for result in results.values():
        keys += [k for k in result["metrics"] if k not in keys]
    return keys


def render_comparison(results: dict[str, dict], failures: dict[str, str], header: str) -> str:
    """One row per metric, one column per model."""
    names = list(results)

    def row(label: str, cells) -> str:
        return f"| {label} | " + " | ".join(cells) + " |"

    lines = [header, "", row("metric", names), "| --- |" + " ---: |" * len(names)]
    for key in _metric_keys(results):
        lines.append(row(key, (format_value(results[n]["metrics"][key]) if key in results[n]["metrics"] else "-" for n in names)))
    lines.append(row("examples", (str(results[n]["examples"]) for n in names)))
    lines += [f"\nNot evaluated: {name}: {message.splitlines()[0]}" for name, message in failures.items()]
    return "\n".join(lines) + "\n"


def plot_comparison(path: Path, results: dict[str, dict], title: str) -> None:
    """A grouped bar chart: one group per metric (per category), one bar per model."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, no display needed

    keys, names = _metric_keys(results), list(results)
    fractions = all(0.0 <= r["metrics"][k] <= 1.0 for r in results.values() for k in r["metrics"])
    scale = 100.0 if fractions else 1.0
    fig = Figure(figsize=(max(6.0, 0.35 * len(keys) * len(names) + 2) + 2.5, 4.5))  # + room for the legend
    ax = fig.subplots()
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        values = [scale * results[name]["metrics"].get(k, float("nan")) for k in keys]
        bars = ax.bar([i - 0.4 + (j + 0.5) * width for i in range(len(keys))], values, width, label=name)
        ax.bar_label(bars, fmt="%.0f" if fractions else "%.3g", fontsize=7)
    ax.set_xticks(range(len(keys)), keys, rotation=30, ha="right")
    ax.set_ylabel("%" if fractions else "value")
    if fractions:
        ax.set_ylim(0, 112)  # headroom for the labels over 100% bars
        ax.set_yticks(range(0, 101, 20))
    ax.set_title(title)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
