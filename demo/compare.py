"""Run one prompt through several checkpoints and gather what the page shows for each.

Every checkpoint gets the same prompt and the same seed, so differences come from the weights, and sees
the image at its own saved pixel budget. A failure of one checkpoint (it does not load, generation raises,
the task's scorer raises) becomes that checkpoint's `error` and the others still run; nothing here raises
to the web server. A comparison has a time budget: checkpoints not started when it is spent are skipped.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import pandas as pd

from gpg_vl.parsing import extract_think
from gpg_vl.rollout import SamplingParams

from .boxes import is_grounding, predicted_box
from .checkpoints import Checkpoint, PolicyCache
from .inputs import Prompt


@dataclass
class CheckpointResult:
    """What one checkpoint did with the prompt."""

    checkpoint: str
    completion: str = ""  # the assistant turn in full (a base prompt's "<think>" prefix included)
    thinking: str | None = None
    answer: str | None = None
    reward: float | None = None  # None when there is no ground truth (an upload) or no score
    components: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0  # generation time
    load_seconds: float | None = None  # set when this call loaded the checkpoint
    finish_reason: str = ""
    box: list[float] | None = None  # predicted box in original-image pixels (grounding tasks)
    pixel_budget: list[int] | None = None  # [min_pixels, max_pixels] the image was resized into for this checkpoint
    error: str | None = None


def assistant_prefix(messages: list[dict]) -> str:
    """The text a final assistant message puts before the completion (base-model prompts), else ''."""
    last = messages[-1]
    return last["content"] if last["role"] == "assistant" and isinstance(last["content"], str) else ""


def _short_error(e: Exception) -> str:
    first = (str(e).strip().splitlines() or [""])[0][:400]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def run_checkpoint(checkpoint: Checkpoint, prompt: Prompt, params: SamplingParams, task, cache: PolicyCache) -> CheckpointResult:
    """Load (once), generate, parse and score one checkpoint; errors land in `result.error`."""
    result = CheckpointResult(checkpoint.label)
    try:
        cached = checkpoint in cache
        policy = cache.get(checkpoint)
        result.load_seconds = None if cached else round(policy.load_seconds, 3)
    except Exception as e:  # ModelLoadError, but also whatever a corrupt folder makes from_pretrained raise
        result.error = f"could not load this checkpoint: {_short_error(e)}"
        return result
    result.pixel_budget = list(policy.pixel_budget)
    # Scoring maps boxes back through the budget the model saw (RefCOCO). The task objects are shared, which is
    # safe because comparisons run one at a time (concurrency_limit=1 in app.py).
    task.configure_images(policy.processor.budget)
    try:
        start = time.perf_counter()
        rollout = policy.engine.generate([prompt.messages], params)
        result.seconds = round(time.perf_counter() - start, 3)
    except Exception as e:
        result.error = f"generation failed: {_short_error(e)}"
        return result
    raw = rollout.texts[0]
    prefix = assistant_prefix(prompt.messages)
    result.completion = raw if raw.lstrip().startswith(prefix.strip()) else prefix + raw
    result.finish_reason = rollout.finish_reasons[0]
    result.thinking = extract_think(result.completion)
    try:
        result.answer = task.parse_answer(result.completion)
        if is_grounding(task, prompt.example):
            box = predicted_box(task, result.completion, prompt.image, prompt.example)
            result.box = [round(v, 1) for v in box] if box is not None else None
        if prompt.example is not None:
            reward = task.score(raw, prompt.example)  # the task adds a base prompt's prefix itself
            result.reward, result.components = reward.total, dict(reward.components)
    except Exception as e:
        result.error = f"scoring failed: {_short_error(e)}"
    return result


def compare(
    checkpoints: list[Checkpoint],
    prompt: Prompt,
    params: SamplingParams,
    task,
    cache: PolicyCache,
    progress: Callable[[float, str], None] | None = None,
    time_budget_s: float | None = None,
) -> list[CheckpointResult]:
    """`run_checkpoint` for each checkpoint in turn, reporting progress as (fraction done, what now).

    Once `time_budget_s` seconds have passed, the checkpoints not yet started are skipped with an error, so a
    request holds the one-at-a-time queue for at most the budget plus one checkpoint's load and generation.
    """
    results = []
    start = time.perf_counter()
    for i, checkpoint in enumerate(checkpoints):
        if i > 0 and time_budget_s is not None and time.perf_counter() - start > time_budget_s:  # the first always runs
            results.append(CheckpointResult(checkpoint.label, error=f"skipped: this comparison's time budget ({time_budget_s:g} s) was spent"))
            continue
        if progress is not None:
            verb = "generating with" if checkpoint in cache else "loading and generating with"
            progress(i / len(checkpoints), f"{verb} {checkpoint.label} ({i + 1}/{len(checkpoints)})")
        results.append(run_checkpoint(checkpoint, prompt, params, task, cache))
    if progress is not None:
        progress(1.0, "done")
    return results


# ---- how results are shown ------------------------------------------------------------------------


def results_table(results: list[CheckpointResult]) -> pd.DataFrame:
    """One row per checkpoint: reward, its components, the answer and the time taken."""
    names = sorted({k for r in results for k in r.components})
    rows = []
    for r in results:
        row = {"checkpoint": r.checkpoint, "reward": r.reward}
        row.update({k: r.components.get(k) for k in names})
        row.update({"answer": r.answer if r.error is None else f"error: {r.error}", "seconds": r.seconds})
        rows.append(row)
    return pd.DataFrame(rows, columns=["checkpoint", "reward", *names, "answer", "seconds"])


def _figures(r: CheckpointResult) -> str:
    parts = []
    if r.reward is not None:
        parts.append(f"<b>reward {r.reward:g}</b>")
        parts += [f"{html.escape(k)} {v:g}" for k, v in r.components.items()]
    parts.append(f"{r.seconds:.2f} s")
    if r.pixel_budget is not None:
        parts.append(f"images {r.pixel_budget[0]:,}-{r.pixel_budget[1]:,} px")
    if r.load_seconds is not None:
        parts.append(f"loaded in {r.load_seconds:.2f} s")
    if r.finish_reason == "length":
        parts.append("hit max tokens")
    return " &middot; ".join(parts)


def _card(r: CheckpointResult) -> str:
    title = f"<h3>{html.escape(r.checkpoint)}</h3>"
    if r.error and not r.completion:
        return f'<div class="gpg-card gpg-error">{title}<p>{html.escape(r.error)}</p></div>'

    def field_html(name: str, value: str | None) -> str:
        shown = html.escape(value) if value else "<i>none</i>"
        return f'<div class="gpg-field"><span>{name}</span><pre>{shown}</pre></div>'

    box = f"<p>box {r.box}</p>" if r.box is not None else ""
    error = f'<p class="gpg-error">{html.escape(r.error)}</p>' if r.error else ""
    return (
        f'<div class="gpg-card">{title}<p class="gpg-figures">{_figures(r)}</p>{box}{error}'
        f"{field_html('answer', r.answer)}{field_html('thinking', r.thinking)}"
        f"{field_html('full completion', r.completion)}</div>"
    )


def results_html(results: list[CheckpointResult]) -> str:
    """The checkpoints side by side, one card each; every model-written string is HTML-escaped."""
    return '<div class="gpg-cards">' + "".join(_card(r) for r in results) + "</div>"


def results_json(results: list[CheckpointResult]) -> list[dict]:
    return [asdict(r) for r in results]


CARDS_CSS = """
.gpg-cards { display: flex; gap: 12px; align-items: stretch; flex-wrap: wrap; }
.gpg-card { flex: 1 1 280px; min-width: 0; border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 10px 12px; }
.gpg-card h3 { margin: 0 0 4px 0; }
.gpg-card pre { white-space: pre-wrap; word-break: break-word; margin: 2px 0 8px 0; max-height: 260px; overflow-y: auto; }
.gpg-field span { font-weight: 600; font-size: 0.9em; }
.gpg-error { color: #c0262d; }
"""
