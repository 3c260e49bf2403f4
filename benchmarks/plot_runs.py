"""Held-out accuracy (and training reward) of one or more run folders, as one PNG.

    .venv/bin/python benchmarks/plot_runs.py runs/quickstart runs/quickstart-lora --labels full LoRA \
        --out benchmarks/results/quickstart_lora.png
    .venv/bin/python benchmarks/plot_runs.py runs/quickstart --metric eval/accuracy eval/blind/accuracy \
        --out benchmarks/results/quickstart_blind.png    # real vs blind images (eval.controls, docs/eval.md)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders holding metrics.jsonl")
    p.add_argument("--labels", nargs="+", help="one label per run (default: folder names)")
    p.add_argument("--metric", nargs="+", default=["eval/accuracy"], metavar="KEY",
                   help="held-out metrics to plot, one line style each (default: eval/accuracy)")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = p.parse_args(argv)
    labels = args.labels or [r.name for r in args.runs]
    if len(labels) != len(args.runs):
        p.error("give one --labels entry per run")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for run, label in zip(args.runs, labels):
        rows = read_metrics(run)
        for metric, style in zip(args.metric, ["-", "--", ":", "-."] * len(args.metric)):
            held = [(r["step"], r[metric]) for r in rows if metric in r]
            if not held:
                p.error(f"{run}/metrics.jsonl has no {metric!r} (for a control, set eval.controls in the run's config)")
            name = label if len(args.metric) == 1 else f"{label}: {metric.removeprefix('eval/')}"
            left.plot([s for s, _ in held], [v for _, v in held], style, marker="o", label=name)
            print(f"{name}: " + ", ".join(f"{s}:{v:.3f}" for s, v in held))
        right.plot([r["step"] for r in rows if "reward_mean" in r], [r["reward_mean"] for r in rows if "reward_mean" in r], label=label, linewidth=0.8)
    title = args.metric[0] if len(args.metric) == 1 else ", ".join(args.metric)
    left.set(xlabel="step", ylabel=args.metric[0], title=f"held-out {title}", ylim=(0, 1.05))
    right.set(xlabel="step", ylabel="reward_mean", title="training reward (format + accuracy)")
    left.legend()
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
