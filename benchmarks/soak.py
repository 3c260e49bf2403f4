"""Soak: a long run of the tiny model with evaluation, sample logging, TensorBoard and checkpoints on, to
show memory and run-folder growth stay flat. Runs `gpg-vl train --config configs/quickstart.yaml` in a child
process, reads its RSS from /proc every 0.5 s, and at the marks (default steps 200, 1000, 2000) records the
peak RSS so far, the current RSS and the size of each run-folder file; prints a Markdown table.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/soak.py                    # 2,000 steps (hours on 2 cores)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/soak.py --steps 60 --marks 20 40 60 --json /tmp/soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_kib(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) of a process in KiB, from /proc/PID/status (VmRSS, VmHWM)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def folder_sizes(out: Path) -> dict[str, int]:
    """Bytes per top-level entry of the run folder (a folder counts everything under it)."""
    sizes = {}
    for entry in sorted(out.iterdir()):
        files = [entry] if entry.is_file() else [p for p in entry.rglob("*") if p.is_file()]
        sizes[entry.name + ("/" if entry.is_dir() else "")] = sum(p.stat().st_size for p in files if p.exists())
    return sizes


def logged_steps(out: Path) -> int:
    """The step of the last complete line of metrics.jsonl (0 before the first)."""
    metrics = out / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):  # a line being written
            continue
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--marks", type=int, nargs="+", default=[200, 1000, 2000], help="steps at which to record")
    p.add_argument("--output-dir", help="run folder (default: a new temporary one)")
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("overrides", nargs="*", help="extra section.key=value overrides")
    args = p.parse_args(argv)
    out = Path(args.output_dir or tempfile.mkdtemp(prefix="gpg-vl-soak-")) / "run"
    cmd = [
        sys.executable, "-m", "gpg_vl.cli", "train", "--config", str(ROOT / "configs/quickstart.yaml"),
        f"train.max_steps={args.steps}", f"train.output_dir={out}", "logging.progress_bar=false",
        "eval.every=50", "logging.sample_every=50", "checkpoint.save_every=100", *args.overrides,
    ]  # fmt: skip
    print("running:", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    marks, records, peak = sorted(m for m in args.marks if m <= args.steps), [], 0
    while proc.poll() is None:
        try:
            now, peak = rss_kib(proc.pid)
        except (FileNotFoundError, ProcessLookupError):
            break
        step = logged_steps(out)
        while marks and step >= marks[0]:
            records.append({"step": marks.pop(0), "rss_mib": now / 1024, "peak_rss_mib": peak / 1024, "files": folder_sizes(out)})
            print(f"step {records[-1]['step']}: RSS {now / 1024:.0f} MiB, peak {peak / 1024:.0f} MiB", flush=True)
        time.sleep(0.5)
    if proc.wait() != 0:
        print(proc.stderr.read(), file=sys.stderr)
        print(f"soak: the run failed with exit status {proc.returncode}", file=sys.stderr)
        return 1
    if marks:  # the last steps were logged in the final half second
        records.append({"step": marks[-1], "rss_mib": None, "peak_rss_mib": peak / 1024, "files": folder_sizes(out)})
    names = sorted({n for r in records for n in r["files"]})
    print("\n| file | " + " | ".join(f"step {r['step']}" for r in records) + " |")
    print("| --- |" + " ---: |" * len(records))
    rss = [f"{r['rss_mib']:.0f}" if r["rss_mib"] is not None else "-" for r in records]
    print("| RSS now (MiB) | " + " | ".join(rss) + " |")
    print("| peak RSS (MiB) | " + " | ".join(f"{r['peak_rss_mib']:.0f}" for r in records) + " |")
    for n in names:
        print(f"| {n} | " + " | ".join(f"{r['files'].get(n, 0) / 1024:.0f} KiB" for r in records) + " |")
    first, last = records[0]["peak_rss_mib"], records[-1]["peak_rss_mib"]
    print(f"\npeak RSS growth from step {records[0]['step']} to {records[-1]['step']}: {100 * (last - first) / first:+.1f}% (target: within 10%)")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": cmd, "records": records}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
