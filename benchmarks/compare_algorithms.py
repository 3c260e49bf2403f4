"""GPG vs GRPO vs Dr.GRPO on the quickstart task, same compute budget, several seeds.

Every run uses configs/quickstart.yaml (same model, prompts per step, group size, steps, learning rate);
only `algorithm.*` and the seed change. Prints a Markdown table of final held-out accuracy (mean, std,
min, max over seeds) and writes reward/accuracy curves as a PNG.

    .venv/bin/python benchmarks/compare_algorithms.py --seeds 0 1 2 --steps 300 --out runs/compare
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ALGORITHMS = {
    "gpg": [],
    # GRPO as the paper's baselines run it (R1-V): std-normalised advantages, clipped ratio, KL 0.04 to a reference
    "grpo": ["algorithm.kl_coef=0.04"],
    "dr_grpo": [],
}


def run_one(algo: str, seed: int, steps: int, out: Path, extra: list[str]) -> Path:
    folder = out / f"{algo}-seed{seed}"
    if (folder / "metrics.jsonl").exists() and len((folder / "metrics.jsonl").read_text().splitlines()) >= steps:
        return folder  # already done: the script is resumable run by run
    cmd = [
        sys.executable, "-m", "gpg_vl.cli", "train", "--config", "configs/quickstart.yaml",
        f"algorithm.name={algo}", *ALGORITHMS[algo], f"train.seed={seed}", f"train.max_steps={steps}",
        f"train.output_dir={folder}", "logging.progress_bar=false", "checkpoint.save_every=0", "checkpoint.keep_last=1",
        f"eval.every={max(steps // 6, 1)}", *extra,
    ]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return folder


def read(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", type=Path, default=Path("runs/compare"))
    p.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    p.add_argument("overrides", nargs="*", help="extra config overrides for every run")
    args = p.parse_args()

    results: dict[str, list[list[dict]]] = {}
    for algo in args.algorithms:
        results[algo] = [read(run_one(algo, seed, args.steps, args.out, args.overrides)) for seed in args.seeds]

    lines = [
        f"Final held-out accuracy on `shapes` (200 examples, greedy), {args.steps} steps x 8 prompts x G=8, seeds {args.seeds}",
        "",
        "| algorithm | mean | std | min | max | per seed | s/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for algo, runs in results.items():
        finals = [next(r["eval/accuracy"] for r in reversed(log) if "eval/accuracy" in r) for log in runs]
        step_s = statistics.mean(r["step_time_s"] for log in runs for r in log)
        std = statistics.stdev(finals) if len(finals) > 1 else 0.0
        lines.append(
            f"| {algo} | {statistics.mean(finals):.3f} | {std:.3f} | {min(finals):.3f} | {max(finals):.3f} | "
            f"{', '.join(f'{f:.3f}' for f in finals)} | {step_s:.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(table + "\n")
    plot(results, args.out / "curves.png")
    print(f"wrote {args.out / 'results.md'} and {args.out / 'curves.png'}")
    return 0


def plot(results: dict[str, list[list[dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_a) = plt.subplots(1, 2, figsize=(11, 4))
    for (algo, runs), color in zip(results.items(), ("tab:blue", "tab:orange", "tab:green")):
        for i, log in enumerate(runs):
            steps = [r["step"] for r in log]
            acc = [r["reward/accuracy"] for r in log]
            window = 10  # moving average: one step's 64 samples are noisy
            smooth = [sum(acc[max(0, j - window + 1) : j + 1]) / len(acc[max(0, j - window + 1) : j + 1]) for j in range(len(acc))]
            ax_r.plot(steps, smooth, color=color, alpha=0.8, label=algo if i == 0 else None)
            evals = [(r["step"], r["eval/accuracy"]) for r in log if "eval/accuracy" in r]
            ax_a.plot(*zip(*evals), marker="o", color=color, alpha=0.8, label=algo if i == 0 else None)
    ax_r.set(title="training accuracy reward (10-step mean)", xlabel="step", ylim=(0, 1))
    ax_a.set(title="held-out accuracy (greedy)", xlabel="step", ylim=(0, 1))
    for ax in (ax_r, ax_a):
        ax.axhline(0.25, color="grey", linestyle=":", linewidth=1)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
