"""`gpg-vl train`: one on-policy loop for GPG (and the GRPO / Dr.GRPO baselines).

Each step: sample prompts -> roll out G completions each -> score -> resample below beta_th -> advantages
-> loss -> optimizer step -> sync weights to the rollout engine -> log / evaluate / checkpoint.
GPG drops from GRPO: the critic (none here either), the reference model and KL, the ratio and its clip,
and the std normalisation; it adds AGE's alpha = B/(B-M). Run it:

    gpg-vl train --config configs/quickstart.yaml            # offline tiny model, minutes on a CPU
    gpg-vl train --task cvbench model.name_or_path=/path/to/Qwen2-VL-2B-Instruct
    accelerate launch --num_processes 2 -m gpg_vl.cli train --config ...   # DDP
"""

from __future__ import annotations

import copy
import math
import random
import resource
import time
from pathlib import Path

import numpy as np
import torch

from gpg_vl import algorithms
from gpg_vl.checkpoint import atomic_write_text, check_output_dir, load_trainer_state, prepare_run_dir
from gpg_vl.config import Config, ConfigError
from gpg_vl.distributed import (
    all_reduce_max, all_reduce_sum, configure_deepspeed, fail_together, grad_norm_value, is_deepspeed, make_accelerator, micro_batch, needs_lockstep,
    prepare_reference, shard_model,
)
from gpg_vl.groups import PromptSampler, collect_groups
from gpg_vl.guard import NONFINITE, NonFiniteGuard, weights_finite
from gpg_vl.kit import build_builtin
from gpg_vl.logger import RunLogger
from gpg_vl.lora import is_lora, load_adapter_state_dict
from gpg_vl.modeling import check_model_source, check_update_resolution, describe_parameters, load_policy, torch_dtype
from gpg_vl.optim import check_optimizer, make_optimizer, make_scheduler
from gpg_vl.prefix import compute_micro_batch_logprobs
from gpg_vl.recipes import add_arguments, config_from_args, config_to_yaml  # noqa: F401 (add_arguments: the `train` verb's CLI)
from gpg_vl.registry import get_task
from gpg_vl.rollout import check_engine, make_engine, sampling_params
from gpg_vl.runlock import acquire_run_lock, release_held_locks, release_run_lock
from gpg_vl.runstate import restore, save
from gpg_vl.samples import log_samples
from gpg_vl.threads import configure_threads

# ---- CLI: the arguments and the recipes live in gpg_vl.recipes ----------------------------------


def run(args) -> int:
    cfg = config_from_args(args)
    if args.print_config:
        print(config_to_yaml(cfg), end="")  # nothing loaded: the config is all there is to show
        return 0
    try:
        train(cfg)
    finally:  # a run that stops on an error frees its folder too (gpg_vl/runlock.py)
        release_held_locks()
    return 0


# ---- the loop ----------------------------------------------------------------------------------


def train(cfg: Config) -> dict:
    """Run training as configured; returns the last step's metrics (plus held-out ones if evaluated)."""
    use_cuda = torch.cuda.is_available()
    check_optimizer(cfg.optim.name, use_cuda, cfg.train.sharding)
    check_engine(cfg.rollout, use_cuda)
    # model.dtype auto: fp32 master weights under bf16 autocast on CUDA; any other dtype is the weights' own
    accelerator = make_accelerator(use_cuda, "bf16" if use_cuda and cfg.model.dtype == "auto" else "no")  # DeepSpeed on the CPU too
    rank, world = accelerator.process_index, accelerator.num_processes
    configure_threads(world)  # each local process takes its share of the CPUs (gpg_vl/threads.py)
    if cfg.train.prompts_per_step % world:
        raise ConfigError(f"train.prompts_per_step={cfg.train.prompts_per_step} must divide by the {world} processes")
    sharded = cfg.train.sharding == "fsdp"
    if sharded and world < 2:
        raise ConfigError("train.sharding=fsdp needs several processes (accelerate launch or torchrun)")
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    out_dir = Path(cfg.train.output_dir)
    # a fresh run refuses an earlier run's folder (or deletes it: train.overwrite); leftovers of crashed saves go
    # Each phase where one rank may fail alone ends in an agreement: all ranks fail together (fail_together),
    # and the first one is also the barrier before the main process writes to the folder.
    with fail_together():
        check_output_dir(out_dir)  # a path under a file or the root: one line, before the lock tries to create it
        lock = acquire_run_lock(out_dir) if accelerator.is_main_process else None  # one run per folder (gpg_vl/runlock.py)
        resume_dir = prepare_run_dir(out_dir, cfg.checkpoint.resume, cfg.train.overwrite, accelerator.is_main_process)
    algo, G = cfg.algorithm, cfg.rollout.group_size

    # Task, data, policy (weights in model.dtype; fp32 masters under autocast for `auto`), optimizer, schedule
    task, train_examples, eval_examples = load_data(cfg, accelerator)
    with fail_together():
        model, processor, ref_model, state = load_models(cfg, accelerator, resume_dir)
        task.configure_images(processor.budget)  # e.g. RefCOCO maps boxes back with it
    if sharded:  # accelerate builds FSDP on multi-GPU only, so the trainer shards the model itself
        shard_model(model, accelerator.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    if accelerator.is_main_process:
        print(describe_parameters(model, cfg.optim.name))
    scheduler = make_scheduler(optimizer, cfg)
    if is_deepspeed(accelerator):
        configure_deepspeed(accelerator.state.deepspeed_plugin, cfg.optim.micro_batch_size, world, cfg.optim.max_grad_norm)
    if sharded:
        optimizer = accelerator.prepare(optimizer)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    if ref_model is not None and is_deepspeed(accelerator):
        ref_model = prepare_reference(accelerator, ref_model)
    policy = accelerator.unwrap_model(model)
    engine = make_engine(cfg.rollout.engine, policy, processor, cfg.rollout, cfg.model, max(cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens or 0))
    sampler = PromptSampler(len(train_examples), cfg.train.seed, rank, world)
    start_step = restore(accelerator, model, optimizer, scheduler, sampler, state, resume_dir) if resume_dir is not None else 0

    resume_line = state.get("metrics") if resume_dir is not None else None  # the checkpoint step's log line
    with fail_together():  # the main process alone cuts the logs back and writes; a damaged log stops all ranks
        logger = RunLogger(cfg, out_dir, accelerator.is_main_process, cfg.train.max_steps, start_step, resume_line)
        if accelerator.is_main_process:
            atomic_write_text(out_dir / "config.yaml", config_to_yaml(cfg))  # the same YAML --print-config shows
    if resume_dir is not None:
        logger.write(f"resumed from {resume_dir} at step {start_step}")
    metrics: dict = {}
    step_times: list[float] = []
    model.train()
    if eval_examples is not None and cfg.eval.at_start and start_step == 0:
        with accelerator.autocast():
            logger.log(0, {f"eval/{k}": v for k, v in evaluate_heldout(task, engine, eval_examples, cfg, rank, world).items()})

    guard = NonFiniteGuard(cfg.train.on_nonfinite, cfg.optim.lr, out_dir)
    for step in range(start_step + 1, cfg.train.max_steps + 1):
        t0 = time.time()

        # ==== 1. rollout + reward, resampling below the valid-group threshold (beta_th) ====
        # A fixed seed per (step, rank) makes rollouts reproducible across resume; collect_groups adds 7 per extra round.
        sampling = sampling_params(cfg.rollout, seed=cfg.train.seed * 1_000_003 + step * 101 + rank)
        with accelerator.autocast():  # bf16 generation over fp32 masters (`auto` on CUDA), as the loss runs
            groups = collect_groups(
                task, engine, train_examples, sampler, algo, sampling, prompts_per_step=cfg.train.prompts_per_step,
                pad_id=processor.pad_token_id, all_reduce_sum=lambda values: all_reduce_sum(accelerator, values),
            )
        rollout = groups.rollout
        t_rollout = time.time() - t0

        # ==== 2. advantages and AGE's alpha (B / (B - M), counted over all ranks) ====
        advantages = algorithms.compute_advantages(algo.name, groups.rewards, group_size=G, std_normalize=algo.std_normalize)  # [B_local*G]
        valid_fraction = groups.global_valid / groups.global_groups
        alpha = algorithms.age_alpha(valid_fraction) if algo.age else 1.0
        skipped = groups.global_valid == 0  # no group carries a gradient: skip the step, never NaN
        if groups.nonfinite_rewards and not guard.check_step(step, NONFINITE[0]):  # stop (raises) or skip
            skipped = True
            logger.write(f"step {step}: {groups.nonfinite_rewards} {NONFINITE[0]}; step not applied (train.on_nonfinite=skip)")

        # ==== 3. loss over micro-batches; normalisers count the WHOLE batch on all ranks ====
        # A zero-advantage sequence adds nothing to the gradient (without KL), so only the others are
        # run forward; they still count in the normalisers, which keeps the loss exactly the paper's.
        carries = [i for i in range(len(rollout)) if advantages[i] != 0 or ref_model is not None]
        totals = all_reduce_sum(accelerator, [int(rollout.response_mask.sum()), len(rollout)])  # tokens, sequences
        n_micro = all_reduce_max(accelerator, math.ceil(len(carries) / cfg.optim.micro_batch_size))
        loss_sum, loss_metrics, grad_norm, mismatch = 0.0, {}, 0.0, [0.0, 0.0, 0]
        if not skipped:
            old_logprobs: dict[int, torch.Tensor] = {}  # the first iteration's, per micro-batch (GRPO's ratio)
            for iteration in range(algo.num_iterations):
                loss_part, part_metrics, mismatch_part = accumulate_gradients(
                    cfg, accelerator, model, ref_model, processor, groups, advantages, carries, n_micro, alpha, totals, old_logprobs,
                )
                loss_sum += loss_part
                loss_metrics = {k: loss_metrics.get(k, 0.0) + v for k, v in part_metrics.items()}
                if iteration == 0:
                    mismatch = mismatch_part

                # ==== 4. optimizer step, unless the non-finite guard (gpg_vl/guard.py) says otherwise ====
                max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")  # inf: measure only
                grad_norm = grad_norm_value(accelerator.clip_grad_norm_(params, max_norm))
                bad = guard.reason(all_reduce_sum(accelerator, guard.flags(None, loss_sum, grad_norm)))  # every rank agrees
                if guard.check_step(step, bad):
                    optimizer.step()
                    guard.check_weights(step, all_reduce_sum(accelerator, [int(not weights_finite(params))])[0] == 0)
                else:
                    logger.write(f"step {step}: {bad}; step not applied (train.on_nonfinite=skip)")
                optimizer.zero_grad(set_to_none=True)
            scheduler.step()

            # ==== 5. sync weights to the rollout engine ====
            engine.sync_weights(policy)

        # ==== 6. log, evaluate, checkpoint ====
        step_times.append(time.time() - t0)
        metrics = step_metrics(accelerator, cfg, groups, advantages, skipped, valid_fraction, alpha, loss_sum, loss_metrics, grad_norm, mismatch)
        metrics.update({"lr": scheduler.get_last_lr()[0], "step_time_s": step_times[-1], "rollout_time_s": t_rollout})
        if skipped and not groups.nonfinite_rewards:
            logger.write(f"step {step}: every group had equal rewards; skipped (no optimizer step)")
        if cfg.logging.sample_every and step % cfg.logging.sample_every == 0:
            log_samples(logger, step, groups, G, cfg.logging.num_samples, advantages, processor.tokenizer, task)
        # Save BEFORE evaluating: an OOM in eval must not cost the last save_every steps. The checkpoint
        # carries this step's metrics, so a resume after a crash in eval still logs the step (without eval/).
        if step == cfg.train.max_steps or (cfg.checkpoint.save_every and step % cfg.checkpoint.save_every == 0):
            save(accelerator, model, processor, optimizer, scheduler, sampler, step, cfg, dict(metrics))
        if eval_examples is not None and ((cfg.eval.every and step % cfg.eval.every == 0) or (cfg.eval.at_end and step == cfg.train.max_steps)):
            with accelerator.autocast():
                metrics.update({f"eval/{k}": v for k, v in evaluate_heldout(task, engine, eval_examples, cfg, rank, world).items()})
        logger.log(step, metrics)

    logger.close()
    if lock is not None:
        release_run_lock(lock)
    if accelerator.is_main_process and step_times:
        print(
            f"done: {len(step_times)} steps, {np.mean(step_times):.2f} s/step (median {np.median(step_times):.2f}), "
            f"peak memory {peak_memory_mb(accelerator.device):.0f} MiB; run folder {out_dir}"
        )
        if any(k.startswith("eval/") for k in metrics):
            print("held-out: " + ", ".join(f"{k[5:]}={v:.3f}" for k, v in metrics.items() if k.startswith("eval/")))
    accelerator.wait_for_everyone()
    return metrics


# ---- the stages the loop calls ------------------------------------------------------------------


def load_data(cfg: Config, accelerator):
    """The task and its training and held-out examples (a hub model that cannot be loaded fails first).
    A failure on any rank ends every rank with the same error (`fail_together`)."""
    with fail_together():  # a builtin preset is built once per machine, by its local main process, first
        if accelerator.is_local_main_process:
            build_builtin(cfg.model.name_or_path)  # the explicit build step (gpg_vl.kit)
    with fail_together():
        check_model_source(build_builtin(cfg.model.name_or_path))  # built by now: only resolves the path
        task = get_task(cfg.task.name, **cfg.task.options)
        train_examples = task.load(cfg.task.train_data, cfg.task.train_split)
        if cfg.train.train_limit:
            train_examples = train_examples[: cfg.train.train_limit]
        eval_examples = None
        if cfg.eval.every or cfg.eval.at_end or cfg.eval.at_start:
            eval_examples = task.load(cfg.task.eval_data, cfg.task.eval_split)[: cfg.task.eval_limit]
    return task, train_examples, eval_examples


def load_models(cfg: Config, accelerator, resume_dir: Path | None):
    """(policy, processor, reference model or None, the resumed trainer state or None)."""
    model_cfg, state = copy.deepcopy(cfg.model), None
    weights_dtype = torch.float32 if cfg.model.dtype == "auto" else torch_dtype(cfg.model.dtype, accelerator.device)
    if resume_dir is not None:
        state = load_trainer_state(resume_dir)
        if not cfg.model.lora.r:  # LoRA re-reads its frozen base and restores the adapter from the state
            model_cfg.name_or_path = str(resume_dir)
    model, processor = load_policy(model_cfg, accelerator.device, weights_dtype)
    check_update_resolution(model, cfg.optim.lr)  # bf16 weights at lr 1e-6 would barely train: refused
    if state is not None and is_lora(model):
        load_adapter_state_dict(model, state["adapter"])
    ref_model = None
    if cfg.algorithm.kl_coef > 0:  # only algorithms registered with kl_coef accept it (GPG never loads a reference)
        ref_cfg = copy.deepcopy(cfg.model)
        ref_cfg.lora.r = 0  # the reference is the base policy, without adapters
        ref_model, _ = load_policy(ref_cfg, accelerator.device, weights_dtype)
        ref_model.eval().requires_grad_(False)
    return model, processor, ref_model, state


def accumulate_gradients(cfg, accelerator, model, ref_model, processor, groups, advantages, carries, n_micro, alpha, totals, old_logprobs):
    """One backward pass over the rows that carry a gradient, in `n_micro` micro-batches (the same count on
    every rank: a rank with fewer runs one with weight 0). Returns (loss, loss metrics, mismatch [sum, max,
    count] of |trainer - engine| log p). `old_logprobs` is filled on the first call, read on later ones."""
    rollout, algo, world = groups.rollout, cfg.algorithm, accelerator.num_processes
    mask = rollout.response_mask  # [B_local*G, L]
    # each prompt once per micro-batch (gpg_vl/prefix.py); checkpointing drops the KV cache it needs
    shared = cfg.optim.shared_prefix and not cfg.model.gradient_checkpointing
    lengths = [int(n) for n in mask.sum(1).tolist()]
    chunks = micro_batches(carries, cfg.optim.micro_batch_size, n_micro, lengths, rollout.prompt_indices if shared else None)
    first = not old_logprobs
    loss_sum, loss_metrics, mismatch = 0.0, {}, [0.0, 0.0, 0]
    for k, rows in enumerate(chunks):
        idle = not rows  # this rank has fewer micro-batches: it runs one with weight 0
        rows, weight = (carries[:1] or [0], 0.0) if idle else (rows, 1.0)
        width = max(1, max(lengths[r] for r in rows))  # drop the padding no row here needs
        ids, row_mask = rollout.completion_ids[rows, :width], mask[rows, :width]  # [m, width]
        owners = [rollout.prompt_indices[r] for r in rows]
        sync = micro_batch(accelerator, model, last=k == len(chunks) - 1)  # one sync/step per GPG step
        with sync, accelerator.autocast():
            logprobs = compute_micro_batch_logprobs(model, processor, groups.prompts, owners, ids, row_mask, cfg.rollout.temperature, shared)  # [m, width]
            sampled = rollout.logprobs[rows, :width].to(logprobs.device)  # the engine's own [m, width]
            if first:
                old_logprobs[k] = logprobs.detach()
                if not idle:
                    total, top, count = algorithms.mismatch_stats(logprobs, sampled, row_mask)
                    mismatch = [mismatch[0] + total, max(mismatch[1], top), mismatch[2] + count]
            ref = None
            if ref_model is not None:
                with torch.no_grad():
                    ref = compute_micro_batch_logprobs(ref_model, processor, groups.prompts, owners, ids, row_mask, cfg.rollout.temperature, shared)
            loss, m = algorithms.compute_policy_loss(
                algo.name, logprobs, advantages[rows].to(logprobs.device), row_mask.to(logprobs.device),
                alpha=alpha, old_logprobs=old_logprobs[k], ref_logprobs=ref,
                clip_eps=algo.clip_eps, clip_eps_high=algo.clip_eps_high, kl_coef=algo.kl_coef, loss_agg=algo.loss_agg,
                rollout_logprobs=sampled, rollout_correction=algo.rollout_correction, tis_cap=algo.tis_cap,
                total_tokens=totals[0], total_sequences=totals[1], max_response_length=cfg.rollout.max_new_tokens,
            )
            # DDP averages gradients over ranks; the normalisers are global, so undo the mean
            accelerator.backward(loss * weight * world)
        loss_sum += loss.item() * weight
        for key, value in m.items():
            loss_metrics[key] = loss_metrics.get(key, 0.0) + value * len(rows) * weight / max(len(carries), 1)
    return loss_sum, loss_metrics, mismatch


def step_metrics(accelerator, cfg, groups, advantages, skipped, valid_fraction, alpha, loss_sum, loss_metrics, grad_norm, mismatch) -> dict:
    """The step's line in metrics.jsonl (without lr and timings), reduced over ranks where it sums."""
    rollout, mask = groups.rollout, groups.rollout.response_mask
    metrics = {
        "loss": all_reduce_sum(accelerator, [loss_sum])[0] / cfg.algorithm.num_iterations,
        "reward_mean": float(groups.rewards.mean()),
        "reward_std": float(groups.rewards.std()) if len(groups.rewards) > 1 else 0.0,
        **{f"reward/{k}": float(np.mean([c.get(k, 0.0) for c in groups.components])) for k in groups.components[0]},
        "valid_fraction": valid_fraction,
        "pool_valid_fraction": groups.pool_valid_fraction,
        "alpha": alpha,
        "resample_attempts": groups.resample_attempts,
        "skipped": int(skipped),
        "completion_length": float(mask.sum(1).mean()),
        "truncated_fraction": sum(f == "length" for f in rollout.finish_reasons) / len(rollout),
        "grad_norm": grad_norm,
        **{f"loss/{k}": v for k, v in loss_metrics.items() if k not in ("alpha", "valid_fraction")},
    }
    if not skipped:  # the mismatch a user should see before it hurts (vLLM's kernels differ from training's)
        top = all_reduce_max(accelerator, float(mismatch[1]))
        total, count = all_reduce_sum(accelerator, [mismatch[0], mismatch[2]])
        metrics.update({"rollout/mismatch_mean": total / max(count, 1), "rollout/mismatch_max": float(top)})
    return metrics


def micro_batches(
    rows: list[int], size: int, count: int, lengths: list[int] | None = None, prompt_indices: list[int] | None = None
) -> list[list[int]]:
    """Split `rows` into exactly `count` chunks of at most `size` (DDP needs the same count on every rank).

    With `lengths`, longest rows first and similar lengths together, since a micro-batch pays for its longest
    row; with `prompt_indices` too, a group's rows stay adjacent (the shared-prefix forward runs each prompt
    once per micro-batch) and groups are ordered by their longest row. The sum over micro-batches is unchanged.
    """
    if lengths is not None:
        if prompt_indices is None:
            rows = sorted(rows, key=lambda r: (-lengths[r], r))
        else:
            longest: dict[int, int] = {}
            for r in rows:
                longest[prompt_indices[r]] = max(longest.get(prompt_indices[r], 0), lengths[r])
            rows = sorted(rows, key=lambda r: (-longest[prompt_indices[r]], prompt_indices[r], -lengths[r], r))
    chunks = [rows[i : i + size] for i in range(0, len(rows), size)]
    return chunks + [[] for _ in range(count - len(chunks))]


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def evaluate_heldout(task, engine, examples, cfg: Config, rank: int = 0, world: int = 1) -> dict[str, float]:
    """Greedy completions on the held-out split, scored with the task's own metrics, then once more per
    `eval.controls` entry (`<control>/<metric>`, `visual_gain/<metric>`). Each of the `world` processes
    generates one slice; the metrics are computed once, on the whole split, and every rank gets them."""
    from gpg_vl.generation import evaluate_completions

    params = sampling_params(cfg.rollout, n=1, temperature=0.0, max_new_tokens=cfg.eval.max_new_tokens)
    lockstep = cfg.train.sharding == "fsdp" or needs_lockstep(getattr(engine, "model", None))  # FSDP2, ZeRO-3: every rank runs every forward
    _, metrics = evaluate_completions(task, engine, examples, params, cfg.eval.batch_size, rank, world, lockstep)
    if not cfg.eval.controls:
        return metrics
    from gpg_vl.controls import ControlledTask, with_controls

    # one more greedy pass per control (docs/eval.md): blind or shuffled images, scored against the true answers
    by_control = {
        control: evaluate_completions(ControlledTask(task, control, examples), engine, examples, params,
                                      cfg.eval.batch_size, rank, world, lockstep)[1]
        for control in cfg.eval.controls
    }  # fmt: skip
    return with_controls(metrics, by_control)
