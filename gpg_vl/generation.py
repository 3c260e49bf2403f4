"""Generation for evaluation, shared by the trainer's held-out evaluation and `gpg-vl eval`.

`generate_batch` turns examples into prompts and asks a rollout engine for completions; an example whose
image cannot be used gets an error instead of breaking the batch. With several processes each rank
generates one contiguous slice (`shard_bounds`) and `gather_to_all` puts the slices back in order, so
metrics are computed once, on the whole set, exactly as a single process would.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gpg_vl.data import DataError
from gpg_vl.task import Task

if TYPE_CHECKING:
    from gpg_vl.rollout import RolloutEngine, SamplingParams


@dataclass
class Generated:
    """What the model produced for one example."""

    prompt: str  # the text of the chat messages, each image shown as <image>
    completions: list[str]  # [n] sampled completions; [] when the prompt could not be built
    error: str | None = None  # why the prompt could not be built (missing or unreadable image)


def generate_batch(
    task: Task, engine: RolloutEngine, examples: Sequence[dict], sampling: SamplingParams, lockstep: bool = False
) -> list[Generated]:
    """`sampling.n` completions per example; an example whose images cannot be read gets an error instead.

    `lockstep` (sharded weights): a batch whose every prompt failed still runs the engine once, on a blank
    text prompt whose output is dropped, because the other ranks' forwards wait for this one."""
    from gpg_vl.images import check_usable, message_images

    prompts, out = [], []
    for example in examples:
        try:
            messages = task.messages(example)
            for image in message_images(messages):  # fail here, on this example, not inside the engine's batch
                try:
                    check_usable(image)
                except ValueError as e:
                    raise DataError(f"example {example.get('id', '?')}: unusable image: {e}") from None
        except DataError as e:
            out.append(Generated("", [], str(e)))
            continue
        prompts.append(messages)
        out.append(Generated(prompt_text(messages), []))
    if lockstep and not prompts:
        engine.generate([[{"role": "user", "content": [{"type": "text", "text": ""}]}]], sampling)
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


# ---- several processes: one slice each, gathered back in order -------------------------------------------


def shard_bounds(count: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous slice of `count` items; the first `count % world` ranks get one more.

    Contiguous (not strided) so that concatenating the slices in rank order gives back the original order.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world} processes")
    size, extra = divmod(count, world)
    start = rank * size + min(rank, extra)
    return start, start + size + (rank < extra)


def gather_to_all(items: list, world: int) -> list:
    """Every rank's `items` (picklable), concatenated in rank order, on every rank."""
    if world == 1:
        return list(items)
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"gathering over {world} processes needs an initialised torch.distributed process group")
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


def broadcast_from_main(value: Any, world: int) -> Any:
    """Rank 0's `value` (picklable) on every rank."""
    if world == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def evaluate_completions(
    task: Task,
    engine: RolloutEngine,
    examples: Sequence[dict],
    sampling: SamplingParams,
    batch_size: int,
    rank: int = 0,
    world: int = 1,
    lockstep: bool = False,
) -> tuple[list[str], dict[str, float]]:
    """Generate for `examples` in batches of `batch_size` prompts; (first completion per example, metrics).

    With `world` > 1 (a torch.distributed process group) this rank generates only its slice; every rank gets
    all completions back, in order, and the metrics rank 0 computed on the full set. Examples whose images
    cannot be read get "" and are left out of the metrics (a warning says how many).
    """
    # Trap: a sharded model (FSDP2, ZeRO-3) gathers weights inside every forward, so all ranks must run the
    # same number of batches (`lockstep`): a shorter slice is padded with one of its examples, dropped after.
    start, stop = shard_bounds(len(examples), rank, world)
    mine_examples = list(examples[start:stop])
    if lockstep and examples:
        longest = -(-len(examples) // world)
        mine_examples += [examples[min(start, len(examples) - 1)]] * (longest - len(mine_examples))
    step = max(1, batch_size)
    mine: list[Generated] = []
    for first in range(0, len(mine_examples), step):
        mine += generate_batch(task, engine, mine_examples[first : first + step], sampling, lockstep)
    generated = gather_to_all(mine[: stop - start], world)
    if len(generated) != len(examples):
        raise RuntimeError(f"gathered {len(generated)} results for {len(examples)} examples over {world} processes")
    metrics = None
    if rank == 0:  # scoring can be slow (math-verify); do it once and share the result
        errors = [g.error for g in generated if g.error is not None]
        if errors:
            print(f"warning: {len(errors)} of {len(examples)} examples skipped; first: {errors[0]}", file=sys.stderr)
        metrics = compute_metrics(task, examples, [g.completions for g in generated])
    metrics = broadcast_from_main(metrics, world)
    return [g.completions[0] if g.completions else "" for g in generated], metrics
