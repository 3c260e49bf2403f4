"""What `gpg-vl eval` reports from the records: summary.json/.md per model, comparison.md/.png across models.

summary.json holds exactly what `task.metrics` returns (keys verbatim), plus pass@k with several samples and
the visual-dependence controls (`blind/<metric>`, `shuffled/<metric>`, `visual_gain/<metric>`);
the Markdown shows fractions as percentages, the way papers report them. Nothing here generates or scores.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gpg_vl.atomic import atomic_write_text
from gpg_vl.controls import with_controls
from gpg_vl.generation import compute_metrics
from gpg_vl.records import RECORDS, RUN_JSON, SUMMARY_JSON, SUMMARY_MD, pass_at_k_metrics
from gpg_vl.task import Task


def write_summary(
    name: str, folder: Path, task: Task, examples, records: list[dict], settings: dict, controls: dict[str, list[dict]] | None = None
) -> dict:
    """summary.json (the task's metrics, plus pass@k with several samples), summary.md and run.json's counts.
    `controls` (control -> its records, aligned with `records`) adds `<control>/<metric>` and
    `visual_gain/<metric>` (gpg_vl.controls), each control scored on its first completions.

    Returns {"metrics", "examples" (scored), "errors" (error records), "first_error" (its message or None)}.
    """
    samples = [[] if "error" in r else r.get("completions", [r["completion"]]) for r in records]
    metrics = compute_metrics(task, examples, samples)
    counts = [(len(s), r.get("num_correct")) for s, r in zip(samples, records) if s]
    if settings["num_samples"] > 1 and counts and all(c is not None for _, c in counts):
        metrics.update(pass_at_k_metrics(counts))
    if controls:
        first = [[] if "error" in r else [r["completion"]] for r in records]
        by_control = {}
        for control, control_records in controls.items():
            # an example counts in a control only where it counts in the real pass too: the same examples
            ok = [[] if "error" in c or not f else [c["completion"]] for f, c in zip(first, control_records)]
            by_control[control] = compute_metrics(task, examples, ok)
        metrics = with_controls(metrics, by_control)
    errors = [r for r in records if "error" in r]
    info = {"examples": len(records) - len(errors), "errors": len(errors)}
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
    return {"metrics": metrics, **info, "first_error": errors[0]["error"] if errors else None}


def format_value(value: float, key: str = "") -> str:
    """Fractions in [0, 1] as percentages (the way papers report them), a visual gain in [-1, 1] as signed
    percentage points; anything else as a plain number."""
    if key.startswith("visual_gain/") and isinstance(value, (int, float)) and -1.0 <= value <= 1.0:
        return f"{100 * value:+.1f} pts"
    if isinstance(value, (int, float)) and 0.0 <= value <= 1.0:
        return f"{100 * value:.1f}%"
    return f"{value:.4g}" if isinstance(value, (int, float)) else str(value)


def render_summary(name: str, settings: dict, metrics: dict[str, float], info: dict) -> str:
    """summary.md: what was evaluated, how it was decoded, and a metric | value table."""
    decoding = "greedy" if settings["temperature"] <= 0 else f"T={settings['temperature']}, {settings['num_samples']} samples"
    lines = [
        f"# {name}",
        "",
        f"`{settings['model']}` on task `{settings['task']}` (`{settings['data']}`, split `{settings['split']}`), {decoding}: "
        f"{info['examples']} examples" + (f", {info['errors']} skipped (unreadable images)" if info["errors"] else ""),
        "",
        "| metric | value |",
        "| --- | ---: |",
        *(f"| {key} | {format_value(value, key)} |" for key, value in metrics.items()),
    ]
    return "\n".join(lines) + "\n"


def _metric_keys(results: dict[str, dict]) -> list[str]:
    keys: list[str] = []
    for result in results.values():
        keys += [k for k in result["metrics"] if k not in keys]
    return keys


def render_comparison(results: dict[str, dict], failures: dict[str, str], header: str) -> str:
    """comparison.md: one row per metric, one column per model, then the models that were not evaluated."""
    names = list(results)

    def row(label: str, cells) -> str:
        return f"| {label} | " + " | ".join(cells) + " |"

    lines = [header, "", row("metric", names), "| --- |" + " ---: |" * len(names)]
    for key in _metric_keys(results):
        lines.append(row(key, (format_value(results[n]["metrics"][key], key) if key in results[n]["metrics"] else "-" for n in names)))
    lines.append(row("examples", (str(results[n]["examples"]) for n in names)))
    lines += [f"\nNot evaluated: {name}: {message.splitlines()[0]}" for name, message in failures.items()]
    return "\n".join(lines) + "\n"


def plot_comparison(path: Path, results: dict[str, dict], title: str) -> None:
    """comparison.png: a grouped bar chart, one group per metric (per category), one bar per model."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, no display needed

    keys, names = _metric_keys(results), list(results)
    # a visual gain is a difference of fractions, in [-1, 1]: it keeps the percent scale
    fractions = all(-1.0 <= v <= 1.0 if k.startswith("visual_gain/") else 0.0 <= v <= 1.0
                    for r in results.values() for k, v in r["metrics"].items())  # fmt: skip
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
        low = min([0.0] + [scale * v for r in results.values() for v in r["metrics"].values()])
        ax.set_ylim(min(0.0, low - 12), 112)  # headroom for the labels over 100% bars (and under negative gains)
        ax.set_yticks(range(0, 101, 20))
    ax.set_title(title)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
