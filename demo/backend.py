"""The demo's state and the work behind each page action, free of Gradio so tests call it directly.

`DemoBackend` holds the task (one instance per prompt style), its examples, the checkpoint allow-list and
the policy cache. Its methods take the page's plain values and return plain values plus `warnings`, the
messages `app.py` shows as toasts; none of them raises on bad input. The limits that keep one request from
holding the one-at-a-time comparison queue (question length, tokens, checkpoints, time) are enforced here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd
from PIL import Image

from gpg_vl.registry import get_task
from gpg_vl.config import RolloutConfig
from gpg_vl.rollout import sampling_params

from . import inspector, runs
from .boxes import draw_boxes, enlarged, is_grounding, truth_in_pixels
from .checkpoints import CheckpointAllowList, PolicyCache, UnknownCheckpoint, saved_steps
from .compare import CheckpointResult, compare, results_html, results_json, results_table
from .inputs import PROMPT_STYLES, UploadError, example_prompt, ground_truth_text, prompt_text, read_upload, upload_prompt

SOURCES = ("Task example", "Your image")
DEFAULT_STYLE = "task default"  # for a task without a prompt_style option
MAX_NEW_TOKENS = 1024  # per checkpoint and request
MAX_CHECKPOINTS = 8  # per comparison
TIME_BUDGET_S = 300.0  # a comparison starts no new checkpoint after this (see compare.compare)
# metrics.jsonl fields shown above a logged step in the inspector
STEP_FIELDS = ("reward_mean", "valid_fraction", "pool_valid_fraction", "alpha", "resample_attempts", "skipped", "completion_length")


@dataclass
class ComparisonView:
    """Everything a comparison puts on the page."""

    image: Image.Image | None = None  # the input image, with boxes drawn for grounding tasks
    table: pd.DataFrame = field(default_factory=lambda: results_table([]))
    cards: str = ""
    raw: list[dict] = field(default_factory=list)
    status: str = ""
    warnings: list[str] = field(default_factory=list)


def make_task_variants(name: str) -> dict:
    """The task once per prompt style it accepts; a task without the option once, as 'task default'."""
    variants = {}
    for style in PROMPT_STYLES:
        try:
            variants[style] = get_task(name, prompt_style=style)
        except (TypeError, ValueError):  # the task has no prompt_style option, or not this style
            continue
    return variants or {DEFAULT_STYLE: get_task(name)}


class DemoBackend:
    """State shared by every browser session of one `gpg-vl demo` server."""

    def __init__(
        self,
        models: list[str],
        run_folders: list[str] = (),
        task: str = "shapes",
        data: str | None = None,
        split: str | None = None,
        device: str = "cpu",
        capacity: int = 4,
        time_budget_s: float = TIME_BUDGET_S,
    ):
        self.allow = CheckpointAllowList(models, run_folders)
        self.cache = PolicyCache(device, capacity)  # each checkpoint at its own saved pixel budget
        self.time_budget_s = time_budget_s
        self.task_name = task
        self.tasks = make_task_variants(task)  # configure_images is called per checkpoint, in compare.py
        first = next(iter(self.tasks.values()))
        self.split = split or first.default_eval_split
        self.data = data or first.default_eval_data
        self.examples, self.data_error = [], None
        try:
            self.examples = list(first.load(data, self.split))
        except Exception as e:  # offline hub, missing file: the page still works with uploads
            self.data_error = f"Could not load examples of `{task}` ({self.data}, split {self.split}): {e}"

    @property
    def styles(self) -> list[str]:
        return list(self.tasks)

    def task(self, style: str):
        return self.tasks.get(style) or next(iter(self.tasks.values()))

    # ---- the input panel ------------------------------------------------------------------------
    def example_view(self, index, style: str) -> tuple[Image.Image | None, str]:
        """The example's image (ground-truth box drawn) and a Markdown block with its prompt and truth."""
        if not self.examples:
            return None, self.data_error or "This split has no examples."
        index = min(max(int(index or 0), 0), len(self.examples) - 1)
        task, example = self.task(style), self.examples[index]
        try:
            prompt = example_prompt(task, example)
        except Exception as e:
            return None, f"Example {index} cannot be shown: {e}"
        truth = ground_truth_text(example)
        if is_grounding(task, example):
            image = draw_boxes(prompt.image, [], truth_in_pixels(task, example, prompt.image.size))
        else:
            image = enlarged(prompt.image)[0]
        text = f"**Example {index}** (id `{task.example_id(example, index)}`)\n\n**Prompt**\n```\n{prompt_text(prompt.messages)}\n```\n"
        text += f"**Ground truth**\n```\n{truth}\n```" if truth else "_No ground truth in this example._"
        return image, text

    def upload_view(self, path) -> tuple[Image.Image | None, list[str]]:
        """The uploaded image, or no image and the reason it was refused."""
        try:
            return read_upload(path), []
        except UploadError as e:
            return None, [str(e)]

    # ---- run folders ------------------------------------------------------------------------------
    def run_view(self, run_label: str | None) -> tuple[list[str], pd.DataFrame, pd.DataFrame, str]:
        """A run's saved steps, its reward and held-out curves, and a one-line summary."""
        if not run_label:
            return [], runs.reward_curve([]), runs.eval_curves([]), ""
        try:
            folder = self.allow.run_folder(run_label)
        except UnknownCheckpoint as e:
            return [], runs.reward_curve([]), runs.eval_curves([]), str(e)
        records = runs.read_metrics(folder)
        steps = [step for step, _ in saved_steps(folder)]
        text = "\n\n".join(t for t in (runs.summary(records), runs.controls_table(records, steps)) if t)
        return self.allow.run_steps(run_label), runs.reward_curve(records), runs.eval_curves(records), text

    # ---- the comparison ---------------------------------------------------------------------------
    def comparison(
        self,
        source: str,
        example_index,
        upload_path,
        question: str,
        labels: list[str],
        style: str,
        greedy: bool,
        temperature: float,
        max_new_tokens,
        seed,
        progress: Callable[[float, str], None] | None = None,
    ) -> ComparisonView:
        """Run every selected checkpoint on the chosen input; problems come back as `warnings`."""
        labels = list(dict.fromkeys(labels or []))  # the same step picked twice runs once
        if not labels:
            return _refused("Pick at least one checkpoint.")
        if len(labels) > MAX_CHECKPOINTS:
            return _refused(f"{len(labels)} checkpoints picked; a comparison runs at most {MAX_CHECKPOINTS}.")
        try:
            max_new_tokens = int(max_new_tokens)
        except (TypeError, ValueError):
            return _refused(f"Max new tokens must be a whole number, got {max_new_tokens!r}.")
        if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
            return _refused(f"Max new tokens must be between 1 and {MAX_NEW_TOKENS}, got {max_new_tokens}.")
        try:
            checkpoints = [self.allow.resolve(label) for label in labels]
        except UnknownCheckpoint as e:
            return _refused(f"Refused: {e}.")
        task = self.task(style)
        try:
            if source == SOURCES[1]:
                prompt = upload_prompt(read_upload(upload_path), question, task)
                where = "your image"
            elif not self.examples:
                raise UploadError(self.data_error or "No examples: upload an image instead.")
            else:
                index = min(max(int(example_index or 0), 0), len(self.examples) - 1)
                prompt, where = example_prompt(task, self.examples[index]), f"example {index}"
        except UploadError as e:
            return _refused(str(e))
        params = sampling_params(  # top_p and top_k as in training's defaults
            RolloutConfig(),
            n=1,
            temperature=0.0 if greedy else max(float(temperature), 1e-3),
            max_new_tokens=max_new_tokens,
            seed=int(seed) if seed is not None else 0,
        )
        results = compare(checkpoints, prompt, params, task, self.cache, progress, self.time_budget_s)
        warnings = [f"{r.checkpoint}: {r.error}" for r in results if r.error]
        sampling = "greedy" if params.greedy else f"temperature {params.temperature:g}"
        status = f"Ran {len(results)} checkpoint(s) on {where} ({sampling}, max {params.max_new_tokens} tokens, seed {params.seed})."
        if prompt.example is None:
            status += " No ground truth for an uploaded image, so no rewards."
        return ComparisonView(
            image=self._drawn(task, prompt, results),
            table=results_table(results),
            cards=results_html(results),
            raw=results_json(results),
            status=status + "".join(f"\n\n**{w}**" for w in warnings),
            warnings=warnings,
        )

    # ---- the rollout inspector ---------------------------------------------------------------------
    def inspector_steps(self, run_label: str | None) -> tuple[list[int], str]:
        """The steps a run logged samples at, and a line saying what there is."""
        if not run_label:
            return [], "Start the demo with `--run RUN_FOLDER` to inspect a run's rollouts."
        try:
            folder = self.allow.run_folder(run_label)
        except UnknownCheckpoint as e:
            return [], str(e)
        steps = inspector.logged_steps(folder)
        if not steps:
            return [], f"`{run_label}` has no `{inspector.SAMPLES_FILE}` yet (the trainer writes it every `logging.sample_every` steps)."
        return steps, f"`{run_label}`: samples logged at {len(steps)} step(s), {steps[0]} to {steps[-1]}."

    def inspector_view(self, run_label: str | None, step) -> tuple[str, str]:
        """A Markdown line of the step's training metrics, and the HTML of its logged groups."""
        if not run_label or step is None:
            return "", ""
        try:
            folder, step = self.allow.run_folder(run_label), int(step)
        except UnknownCheckpoint as e:
            return str(e), ""
        except (TypeError, ValueError):
            return f"Not a step: {step!r}.", ""
        record = next((r for r in reversed(runs.read_metrics(folder)) if int(r["step"]) == step), {})
        shown = [f"`{k}` {record[k]:.3g}" for k in STEP_FIELDS if isinstance(record.get(k), (int, float))]
        line = f"**Step {step}**" + (": " + ", ".join(shown) if shown else " (no metrics line for this step)")
        return line, inspector.step_html(folder, step)

    def _drawn(self, task, prompt, results: list[CheckpointResult]) -> Image.Image:
        if not is_grounding(task, prompt.example):
            return enlarged(prompt.image)[0]
        truth = truth_in_pixels(task, prompt.example, prompt.image.size)
        return draw_boxes(prompt.image, [(r.checkpoint, r.box) for r in results], truth)


def _refused(message: str) -> ComparisonView:
    return ComparisonView(status=message, warnings=[message])
