"""A training run folder as the demo shows it: reward and held-out curves read from `metrics.jsonl`.

The trainer appends one JSON object per step (`step`, `reward_mean`, `eval/<metric>` when it evaluated),
possibly while the demo reads it, so a half-written last line is skipped rather than fatal.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

REWARD_KEYS = ("reward_mean",)
EVAL_PREFIX = "eval/"
CONTROLS = ("blind", "shuffled")  # gpg_vl.controls: logged as eval/<control>/<metric>, eval/visual_gain/<metric>


def read_metrics(run_folder: str | Path) -> list[dict]:
    """The step records of a run, in file order; [] when there is no metrics.jsonl yet."""
    path = Path(run_folder) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line the trainer is still writing
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            records.append(record)
    return records


def _long_form(records: list[dict], keys) -> pd.DataFrame:
    """Rows (step, value, metric) for every finite numeric value of `keys`: what gr.LinePlot draws."""
    rows = [
        {"step": int(r["step"]), "value": float(r[k]), "metric": k}
        for r in records
        for k in keys
        if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) and math.isfinite(r[k])
    ]
    return pd.DataFrame(rows, columns=["step", "value", "metric"])


def reward_curve(records: list[dict]) -> pd.DataFrame:
    """The mean training reward per step."""
    return _long_form(records, REWARD_KEYS)


def eval_curves(records: list[dict]) -> pd.DataFrame:
    """Every held-out metric (`eval/accuracy`, `eval/Total`, `eval/mIoU`, ...) over the steps it was measured."""
    keys = sorted({k for r in records for k in r if k.startswith(EVAL_PREFIX)})
    return _long_form(records, keys)


def controls_table(records: list[dict], steps: list[int]) -> str:
    """Markdown: at each saved checkpoint's step, every metric that has a control (eval.controls) with its real,
    blind and shuffled values and the visual gain; "" when the run logged no control."""
    by_step = {int(r["step"]): r for r in records}
    rows = []
    for step in steps:
        record = by_step.get(step, {})
        metrics = sorted({k.split("/", 2)[2] for k in record if k.startswith(tuple(f"{EVAL_PREFIX}{c}/" for c in CONTROLS))})
        for metric in metrics:
            cells = [record.get(f"{EVAL_PREFIX}{metric}")] + [record.get(f"{EVAL_PREFIX}{c}/{metric}") for c in CONTROLS]
            gain = record.get(f"{EVAL_PREFIX}visual_gain/{metric}")
            shown = ["-" if not isinstance(v, (int, float)) else f"{v:.3f}" for v in cells]
            shown.append("-" if not isinstance(gain, (int, float)) else f"{gain:+.3f}")
            rows.append(f"| checkpoint-{step} | {metric} | " + " | ".join(shown) + " |")
    if not rows:
        return ""
    head = "| checkpoint | metric | real images | blind | shuffled | visual gain |\n| --- | --- | ---: | ---: | ---: | ---: |"
    return "Does the policy look at the image? (held-out, eval.controls)\n\n" + head + "\n" + "\n".join(rows)


def summary(records: list[dict]) -> str:
    """One Markdown line: steps logged, last reward, last held-out figures."""
    if not records:
        return "No `metrics.jsonl` in this run yet."
    last = records[-1]
    text = f"{len(records)} steps logged, last step {int(last['step'])}"
    if isinstance(last.get("reward_mean"), (int, float)):
        text += f", reward_mean {last['reward_mean']:.3f}"
    evals = [r for r in records if any(k.startswith(EVAL_PREFIX) for k in r)]
    if evals:
        shown = {k: v for k, v in evals[-1].items() if k.startswith(EVAL_PREFIX) and isinstance(v, (int, float))}
        text += "; last held-out: " + ", ".join(f"`{k}` {v:.3f}" for k, v in list(shown.items())[:6])
    return text + "."
