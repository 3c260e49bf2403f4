"""`gpg-vl eval`: score one or more checkpoints on a task with the task's own metrics, and compare them.

Run: `gpg-vl eval --task shapes --model builtin:tiny-warm --model runs/gpg/checkpoint-200 --output evals/`
(engine options as in training: `... model.dtype=bfloat16 rollout.engine=vllm rollout.vllm_kwargs={...}`).
This module owns the verb: flags, settings, resume and the per-model loop. Generation lives in
`generation`, records on disk in `records`, summaries and the comparison in `reporting`; docs/eval.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gpg_vl.atomic import atomic_write_text
from gpg_vl.controls import CONTROLS, ControlledTask, check_controls
from gpg_vl.config import DTYPES, ConfigError, ModelConfig, RolloutConfig, load_config, parse_override
from gpg_vl.data import DataError
from gpg_vl.generation import broadcast_from_main, gather_to_all, generate_batch
from gpg_vl.records import (
    COMPARISON_MD, COMPARISON_PNG, RECORDS, RUN_JSON, append_records, example_ids, load_records, make_record,
    unique_model_names,
)  # fmt: skip
from gpg_vl.reporting import plot_comparison, render_comparison, write_summary
from gpg_vl.images import ImageBudget
from gpg_vl.task import Task

if TYPE_CHECKING:
    from gpg_vl.rollout import RolloutEngine, SamplingParams

# Flags that are shorthands for config fields: each becomes that override, and a `section.key=value` one wins.
FLAG_FIELDS = {"dtype": "model.dtype", "min_pixels": "model.min_pixels", "max_pixels": "model.max_pixels",
               "engine": "rollout.engine", "max_new_tokens": "rollout.max_new_tokens"}  # fmt: skip
# Config fields that have an eval flag of their own (or no meaning here).
NOT_OVERRIDES = {"model.name_or_path": "--model", "rollout.group_size": "--num-samples"}


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    default_tokens = RolloutConfig().max_new_tokens
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "example:\n  gpg-vl eval --task shapes --model builtin:tiny-warm --model runs/gpg/checkpoint-200 --output evals/\n"
        "Rerun the same command to resume an interrupted eval; records already written are kept.\n"
        "Overrides take model.* and rollout.* keys of the training config, e.g. rollout.vllm_kwargs={max_model_len: 4096}."
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
    add("--temperature", type=float, help="sampling temperature; 0 is greedy decoding (default: 0)")
    add("--num-samples", type=int, default=1, metavar="N",
        help="completions per example; N > 1 adds pass@k for k = 1, 2, 4, ..., N (needs --temperature > 0)")
    add("--max-new-tokens", type=int, help=f"longest completion (default: {default_tokens}, as in training)")
    add("--min-pixels", type=int, help="smallest image area fed to the model (default: the one saved with the model)")
    add("--max-pixels", type=int, help="largest image area fed to the model (default: the one saved with the model)")
    add("--engine", help="rollout engine: hf (transformers generate) | vllm (CUDA, or vLLM's CPU build: make setup-vllm) (default: hf)")
    add("--seed", type=int, default=0, help="sampling seed (default: 0)")
    add("--controls", nargs="+", choices=CONTROLS, default=[], metavar="CONTROL",
        help="visual-dependence controls, each one more pass: blind (uniform grey images), shuffled (another "
             "example's images); summary.json adds <control>/<metric> and visual_gain/<metric> (docs/eval.md)")
    add("--dtype", choices=DTYPES, help="weights dtype; auto (default) is bfloat16 on CUDA, float32 on the CPU")
    add("overrides", nargs="*", metavar="section.key=value",
        help="model.* / rollout.* config overrides, as for `gpg-vl train` (they win over the flags above)")


# ---- settings, checked before any model is loaded ---------------------------------------------------


def engine_configs(args) -> tuple[ModelConfig, RolloutConfig]:
    """The training config's model and rollout sections for eval: defaults, then each flag of FLAG_FIELDS
    written as the override it stands for, then the `section.key=value` overrides (which win). One validation,
    the training config's, checks them all; an error in a flag's value names the flag. The temperature is
    eval's own: 0 (greedy) is valid here."""
    check_flags(args)
    overrides, temperature = [], args.temperature
    for text in args.overrides:
        key, value = parse_override(text)
        if key.split(".")[0] not in ("model", "rollout") or "." not in key:
            raise ConfigError(f"override {text!r}: gpg-vl eval takes model.* and rollout.* keys only")
        if key in NOT_OVERRIDES:
            raise ConfigError(f"override {text!r}: use {NOT_OVERRIDES[key]} instead")
        if key != "rollout.temperature":
            overrides.append(text)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            temperature = value  # training refuses 0 (no step would train); eval defaults to it
        else:
            raise ConfigError(f"override {text!r}: 'rollout.temperature' must be float, got {value!r}")
    given = {parse_override(text)[0] for text in overrides}
    flags = {key: flag for flag, key in FLAG_FIELDS.items() if getattr(args, flag) is not None and key not in given}
    as_overrides = [f"{key}={getattr(args, flag)}" for key, flag in flags.items()]
    if "rollout.batch_size" not in given:  # one engine call per batch of prompts
        as_overrides.append(f"rollout.batch_size={args.batch_size * args.num_samples}")
    try:
        cfg = load_config(None, as_overrides + overrides)
    except ConfigError as e:
        if e.key not in flags:
            raise
        problem = str(e).split(": ", 1)[-1].removeprefix(e.key + " ")  # "must be >= 1, got 0"
        raise ConfigError(f"--{flags[e.key].replace('_', '-')} {problem}", e.key) from None
    cfg.rollout.temperature = float(temperature or 0.0)
    return cfg.model, cfg.rollout


def check_flags(args) -> None:
    """One-line errors for eval's own flags (no config field holds them)."""
    for name, value in (("--num-samples", args.num_samples), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    if args.temperature is not None and args.temperature < 0:
        raise ConfigError(f"--temperature must be >= 0 (0 is greedy), got {args.temperature}")


def check_args(args, model_cfg: ModelConfig, rollout_cfg: RolloutConfig) -> None:
    """One-line errors for settings the config accepts but eval cannot run, before any data or model is loaded."""
    if rollout_cfg.engine == "vllm" and importlib.util.find_spec("vllm") is None:  # say so once, not once per model
        raise ConfigError("--engine vllm needs vLLM, which is not installed: `pip install 'gpg-vl[vllm]'` on a CUDA machine, or run .venv-vllm/bin/gpg-vl after `make setup-vllm`")
    if args.num_samples > 1 and rollout_cfg.temperature <= 0:
        raise ConfigError("--num-samples > 1 needs --temperature > 0: greedy decoding gives the same completion every time")


def make_task(name: str, options: dict) -> Task:
    from gpg_vl.registry import get_task

    try:
        return get_task(name, **options)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"--task {name}: {e.args[0] if e.args else e}") from None


def pixel_budget(path: str, min_pixels: int | None, max_pixels: int | None) -> ImageBudget:
    """The image budget the model will run with: the given one, else the one saved with the model (read by
    `load_processor`, the same rule `load_policy` applies), without loading any weights."""
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
    return processor.budget


# ---- the verb ---------------------------------------------------------------------------------------------


@dataclass
class EvalRun:
    """What every model shares: the task, its examples (after --limit) with unique ids, the engine configs,
    and this process's place among the processes (`accelerate launch`/`torchrun` start several)."""

    task: Task
    examples: Sequence[dict]
    ids: list[str]
    model_cfg: ModelConfig
    rollout_cfg: RolloutConfig
    batch_size: int
    rank: int = 0
    world: int = 1
    controls: tuple[str, ...] = ()  # visual-dependence controls, each with its own records file

    @property
    def main(self) -> bool:
        return self.rank == 0


def process_place() -> tuple[int, int]:
    """(rank, world): (0, 1) alone; under a launcher, the process group is started here (gloo on the CPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return state.process_index, state.num_processes


def run(args) -> int:
    """Evaluate every --model in turn; 0 when all were evaluated, 1 when any failed (the others still are)."""
    from gpg_vl.distributed import fail_together  # torch: imported when the verb runs, not for `--help`
    from gpg_vl.kit import build_builtin
    from gpg_vl.modeling import ModelLoadError
    from gpg_vl.rollout import sampling_params

    model_cfg, rollout_cfg = engine_configs(args)
    check_args(args, model_cfg, rollout_cfg)
    options = dict(parse_override(text) for text in args.task_option)
    rank, world = process_place()
    with fail_together():  # a task or data error on any rank stops every rank, before any model is loaded
        task = make_task(args.task, options)
        data_path = args.data or task.default_eval_data
        split = args.split or task.default_eval_split
        examples = task.load(data_path, split)
        examples = examples if args.limit is None else examples[: args.limit]
        if not examples:
            raise DataError(f"no examples to evaluate in {data_path or task.name!r} (split {split!r})")
    controls = tuple(check_controls(args.controls, "--controls"))
    shared = EvalRun(task, examples, example_ids(task, examples), model_cfg, rollout_cfg, args.batch_size, rank, world, controls)
    rc = rollout_cfg
    sampling = sampling_params(rc, n=args.num_samples, seed=args.seed)  # its temperature is eval's (0: greedy)
    output = Path(args.output)
    results: dict[str, dict] = {}
    failures: dict[str, str] = {}
    for name, model in zip(unique_model_names(args.model), args.model):
        try:
            with fail_together():  # a builtin preset is built on first use, once per machine
                if int(os.environ.get("LOCAL_RANK", "0")) == 0:
                    build_builtin(model)
            with fail_together():  # a model that does not load on one rank is not evaluated on any
                path = build_builtin(model)  # built by now; a folder or hub id is as given
                # the budget each checkpoint was trained with: builtin tiny models 56x56..112x112, Qwen2-VL its own
                budget = pixel_budget(path, model_cfg.min_pixels, model_cfg.max_pixels)
        except ModelLoadError as e:
            failures[name] = _report_failure(shared, model, name, e)
            continue
        task.configure_images(budget)  # before any message is built or completion scored for this model
        local = Path(model).expanduser()
        settings = {  # what must match for a rerun to resume into the same records
            "model": str(local.resolve()) if local.exists() else model,
            "task": args.task, "task_options": options, "data": data_path, "split": split,
            "temperature": rc.temperature, "num_samples": args.num_samples, "max_new_tokens": rc.max_new_tokens,
            "min_pixels": budget.min_pixels, "max_pixels": budget.max_pixels, "seed": args.seed if rc.temperature > 0 else None,
        }  # fmt: skip
        if rc.temperature > 0 and (rc.top_p, rc.top_k) != (1.0, 0):  # only when set, so older folders still resume
            settings.update(top_p=rc.top_p, top_k=rc.top_k)
        try:
            results[name] = evaluate_model(name, path, output / name, shared, settings, sampling)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # one broken model must not stop the comparison of the others
            expected = isinstance(e, (ModelLoadError, ConfigError, DataError, ImportError))  # others get a traceback
            failures[name] = _report_failure(shared, model, name, e, tb=not expected)
    if len(args.model) > 1 and results and shared.main:
        header = f"Task `{args.task}` on `{data_path}` (split `{split}`)"
        atomic_write_text(output / COMPARISON_MD, render_comparison(results, failures, header))
        plot_comparison(output / COMPARISON_PNG, results, f"{args.task} ({data_path}, {split})")
        print(f"\ncomparison: {output / COMPARISON_MD}, {output / COMPARISON_PNG}")
    if failures:  # on every rank: the ranks agreed on the failures, and each ends with the same line
        print(f"gpg-vl eval: {len(failures)} of {len(args.model)} models not evaluated: {', '.join(failures)}", file=sys.stderr)
    return 1 if failures else 0


def _report_failure(shared: EvalRun, model: str, name: str, error: BaseException, tb: bool = False) -> str:
    """The one line every rank prints; a traceback on the main rank and where the error was first raised
    (`fail_together` raises its copy on every rank `from` the original there)."""
    message = f"{type(error).__name__}: {error}" if tb else str(error)
    if tb and (shared.main or error.__cause__ is not None):
        traceback.print_exception(error.__cause__ or error, file=sys.stderr)
    print(f"gpg-vl eval: model {model!r} ({name}) was not evaluated: {message}", file=sys.stderr)
    return message


def evaluate_model(name: str, path: str, folder: Path, shared: EvalRun, settings: dict, sampling: SamplingParams) -> dict:
    """Generate for the examples that folder/records.jsonl lacks, then write the summary over all of them."""
    from gpg_vl.distributed import fail_together

    settings = json.loads(json.dumps(settings, default=str))  # as it reads back, so the resume check compares like with like
    # Only rank 0 touches the files; the others learn what is done (or why not) from it.
    done, control_done = None, None
    with fail_together():
        if shared.main:  # each control is one more pass with its own records file, resumed the same way
            done = resumable_records(folder, settings)
            control_done = {c: _control_records(folder, c) for c in shared.controls}
    done, control_done = broadcast_from_main((done, control_done), shared.world)
    passes = [(shared.task, done, folder / RECORDS)] + [
        (ControlledTask(shared.task, c, shared.examples), control_done[c], folder / control_records_name(c)) for c in shared.controls
    ]
    todo = [(task, d, p, [i for i, example_id in enumerate(shared.ids) if example_id not in d]) for task, d, p in passes]
    if any(pending for *_, pending in todo):
        with fail_together():  # a model that loads on one rank only is evaluated on none
            engine = load_engine(path, settings, shared)  # only now: a finished eval re-summarises without the model
            if shared.main:
                folder.mkdir(parents=True, exist_ok=True)
                atomic_write_text(folder / RUN_JSON, json.dumps({"settings": settings}, indent=2) + "\n")
        for task, d, records_path, pending in todo:
            if pending:
                _generate_records(name, engine, shared, pending, d, records_path, sampling, task)
        del engine
        _free_memory()
    elif shared.main:
        print(f"{name}: all {len(shared.ids)} examples already in {folder / RECORDS}; recomputing the summary")
    result = None
    with fail_together():
        if shared.main:
            records = [done[i] for i in shared.ids]
            controls = {c: [control_done[c][i] for i in shared.ids] for c in shared.controls}
            result = write_summary(name, folder, shared.task, shared.examples, records, settings, controls)
    result = broadcast_from_main(result, shared.world)
    if result["examples"] == 0:
        raise DataError(f"no example could be evaluated: all {result['errors']} failed (first: {result['first_error']})")
    return result


def resumable_records(folder: Path, settings: dict) -> dict[str, dict]:
    """id -> record of what an earlier run with the same settings wrote (error records are dropped, so those
    examples are retried: the image may be fixed); other settings are refused, listing the differences."""
    records_path = folder / RECORDS
    previous = load_records(records_path)
    if previous and (folder / RUN_JSON).exists():
        earlier = json.loads((folder / RUN_JSON).read_text()).get("settings", {})
        changed = [f"{k}: {earlier.get(k)!r} -> {settings.get(k)!r}" for k in sorted(settings.keys() | earlier.keys())
                   if settings.get(k) != earlier.get(k)]  # fmt: skip
        if changed:
            raise ConfigError(f"{folder} holds records made with other settings ({'; '.join(changed)}); "
                              "use another --output or delete that folder")  # fmt: skip
    if any("error" in r for r in previous):
        previous = [r for r in previous if "error" not in r]
        atomic_write_text(records_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in previous))
    return {r["id"]: r for r in previous}


def control_records_name(control: str) -> str:
    """The records file of one control pass, beside records.jsonl: records.blind.jsonl, records.shuffled.jsonl."""
    return RECORDS.replace(".jsonl", f".{control}.jsonl")


def _control_records(folder: Path, control: str) -> dict[str, dict]:
    """id -> record of an earlier pass of `control` (its settings are run.json's, checked with the main
    records); error records are dropped so those examples are retried."""
    return {r["id"]: r for r in load_records(folder / control_records_name(control)) if "error" not in r}


def load_engine(path: str, settings: dict, shared: EvalRun) -> RolloutEngine:
    from gpg_vl.modeling import inference_device, load_policy
    from gpg_vl.rollout import make_engine

    device = inference_device()
    model_cfg = dataclasses.replace(shared.model_cfg, name_or_path=path, min_pixels=settings["min_pixels"],
                                    max_pixels=settings["max_pixels"])  # fmt: skip
    model, processor = load_policy(model_cfg, device)
    return make_engine(shared.rollout_cfg.engine, model, processor, shared.rollout_cfg, model_cfg)


def _generate_records(name: str, engine, shared: EvalRun, pending: list[int], done: dict, path: Path, sampling,
                      task: Task | None = None) -> None:
    """Rounds of `world` batches: rank r generates and scores the r-th batch of the round, rank 0 appends the
    round's records in order. The batches are those a single process would make, so are the seeds. `task`
    (default: the run's) is a ControlledTask for a control pass."""
    task = task or shared.task
    from tqdm import tqdm

    total, size = len(shared.ids), shared.batch_size
    desc = name if task is shared.task else f"{name} ({task.control})"
    with tqdm(total=total, initial=total - len(pending), unit="ex", desc=desc, dynamic_ncols=True, disable=not shared.main) as bar:
        for start in range(0, len(pending), size * shared.world):
            batch = pending[start + shared.rank * size : start + (shared.rank + 1) * size]
            records = []
            if batch:
                # seeded by the batch's first example: a run resumed at a batch boundary samples what an unbroken one would
                params = dataclasses.replace(sampling, seed=sampling.seed + batch[0]) if sampling.seed is not None else sampling
                generated = generate_batch(task, engine, [shared.examples[i] for i in batch], params)
                records = [make_record(shared.task, shared.examples[i], shared.ids[i], g) for i, g in zip(batch, generated)]
            records = gather_to_all(records, shared.world)
            if shared.main:
                append_records(path, records)
            done.update({r["id"]: r for r in records})
            bar.update(len(records))


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
