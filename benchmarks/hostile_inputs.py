"""Time the built-in tasks on hostile completions: parsing at 1 MB / 10 MB, and geometry grading of a batch
whose every answer stalls math-verify. The figures in docs/tasks.md ("Hostile inputs") come from it.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/hostile_inputs.py parsing --sizes 1000000 10000000
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/hostile_inputs.py grading --n 64

Run it alone on a quiet machine; it prints the load average it started under.
"""

from __future__ import annotations

import argparse
import os
import time

from gpg_vl import get_task

TASKS = ("shapes", "cvbench", "geometry", "lisa", "refcoco", "classification")


def hostile(kind: str, n: int) -> str:
    """A completion of about n characters of one hostile shape (the shapes tests/test_task_hostile.py sweeps)."""
    return {
        "repeated <answer>": "<answer>" * (n // 8),
        "unclosed tags": "<think>" * (n // 14) + "<answer>" * (n // 16),
        "think then open answers": "<think>x</think>" + "<answer>a" * (n // 9),
        "good answer + junk": "<think>x</think><answer>(A)</answer>" + "</think><answer>" * (n // 16),
        "digit run": "<think>x</think><answer>(" + "9" * n + "</answer>",
        "bracket run": "<think>x</think><answer>" + "[" * n + "</answer>",
        "point pairs": "(1," * (n // 3),
        "letters": "<answer>" + "A " * (n // 2) + "</answer>",
    }[kind]


KINDS = ("repeated <answer>", "unclosed tags", "think then open answers", "good answer + junk", "digit run",
         "bracket run", "point pairs", "letters")


def time_parsing(sizes: list[int]) -> None:
    """Seconds for task.score + task.parse_answer of one hostile completion, the slowest shape per task."""
    print("| task | " + " | ".join(f"{n / 1e6:g} MB: slowest shape, s" for n in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for name in TASKS:
        task = get_task(name)
        example = task.load("synthetic:1", "test")[0]
        for kind in KINDS:  # small copies first: geometry's math-verify worker starts and caches "(A)" here
            task.score(hostile(kind, 100), example)
        cells = []
        for n in sizes:
            worst = (0.0, "")
            for kind in KINDS:
                text = hostile(kind, n)
                start = time.perf_counter()
                task.score(text, example)
                task.parse_answer(text)
                worst = max(worst, (time.perf_counter() - start, kind))
            cells.append(f"{worst[0]:.2f} ({worst[1]})")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


def time_grading(n: int) -> None:
    """Geometry: n answers that each stall math-verify, scored one by one (training) and as one eval batch."""
    task = get_task("geometry")
    example = {"id": "0", "image": b"", "question": "q", "ground_truth": "140°"}
    task.score("<think>a</think><answer>2\\sqrt{3}</answer>", example)  # start the worker(s) outside the timing
    # Each took sympy past the 5 s deadline before the pre-check; "+k" keeps them apart in the answer cache.
    nested = ["\\frac{" * (60 + k % 20) + "1" + "}{2}" * (60 + k % 20) + f"+{k}" for k in range(n)]
    strict = [f"<think>a</think><answer>{answer}</answer>" for answer in nested]
    start = time.perf_counter()
    for completion in strict:
        task.score(completion, example)
    print(f"training: {n} strict answers built to stall sympy, scored one by one: {time.perf_counter() - start:.1f} s")
    r1v = [f"<think>so</think> <answer> $9^{{9^{{{9 + k}}}}}$ </answer>" for k in range(n)]
    start = time.perf_counter()
    task.metrics([example] * n, r1v)
    print(f"eval: {n} r1v outputs that hang math-verify, one metrics call: {time.perf_counter() - start:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("parsing", "grading"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000], help="characters")
    parser.add_argument("--n", type=int, default=64, help="completions in the grading batch")
    args = parser.parse_args()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    if args.part == "parsing":
        time_parsing(args.sizes)
    else:
        time_grading(args.n)


if __name__ == "__main__":
    main()
