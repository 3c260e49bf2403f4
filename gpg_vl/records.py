"""What `gpg-vl eval` keeps on disk for each model: one JSON record per example, and the names around them.

records.jsonl is appended and fsynced per batch, so an interrupted eval resumes from it; a record says
whether it was correct through `task.is_correct`, so pass@k needs no knowledge of the task. Folder names
(`model_name`) and example ids (`example_ids`) are stable, because resuming matches on them.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpg_vl.generation import Generated
from gpg_vl.task import Task

RECORDS, SUMMARY_JSON, SUMMARY_MD, RUN_JSON = "records.jsonl", "summary.json", "summary.md", "run.json"
COMPARISON_MD, COMPARISON_PNG = "comparison.md", "comparison.png"

# Folder names that say nothing on their own; the model is then named by its run folder too (run-checkpoint-100).
_GENERIC_NAME = re.compile(r"(checkpoint|step|global_step|epoch|iter)[-_]?\d+|final|best|latest|last|model|hf", re.I)


def make_record(task: Task, example: dict, example_id: str, generated: Generated) -> dict[str, Any]:
    """One records.jsonl line: our fields first, then the task's (`task.record_fields`) unless they clash."""
    if generated.error is not None:
        ours: dict[str, Any] = {"id": example_id, "prompt": "", "completion": "", "error": generated.error}
    else:
        rewards = [task.score(c, example) for c in generated.completions]
        correct = [task.is_correct(r, example) for r in rewards]
        first = generated.completions[0]
        ours = {
            "id": example_id,
            "prompt": generated.prompt,
            "completion": first,
            "parsed_answer": task.parse_answer(first),
            "reward": rewards[0].total,
            "reward_components": rewards[0].components,
            "correct": correct[0],
        }
        if len(generated.completions) > 1:
            ours["completions"] = generated.completions
            ours["num_correct"] = None if None in correct else sum(correct)
    fields = task.record_fields(example)
    return {**ours, **{k: v for k, v in fields.items() if k not in ours}}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"): the chance that
    k of the n samples, drawn without replacement, include at least one of the c correct ones,
    1 - C(n-c, k) / C(n, k).
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_at_k_metrics(counts: Sequence[tuple[int, int]]) -> dict[str, float]:
    """Mean pass@k over examples given (n, c) per example, for k = 1, 2, 4, ... up to n, and n itself."""
    n = min(total for total, _ in counts)
    ks = sorted({2**i for i in range(n.bit_length()) if 2**i <= n} | {n})
    return {f"pass@{k}": sum(pass_at_k(total, c, k) for total, c in counts) / len(counts) for k in ks}


def load_records(path: Path) -> list[dict]:
    """The records an earlier run wrote. A last line cut short by a crash is dropped (from the file too, so
    appends start on a fresh line)."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    end = raw.rfind(b"\n") + 1
    if end < len(raw):
        with open(path, "r+b") as f:
            f.truncate(end)
    return [json.loads(line) for line in raw[:end].decode("utf-8").splitlines() if line.strip()]


def append_records(path: Path, records: Sequence[dict]) -> None:
    """Append and fsync, so a batch is on disk before the next one starts."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def example_ids(task: Task, examples: Sequence[dict]) -> list[str]:
    """`task.example_id` of each example, made unique with `#k` (RefCOCO has several expressions per image)."""
    used: set[str] = set()
    ids = []
    for index, example in enumerate(examples):
        base = candidate = task.example_id(example, index)
        k = 1
        while candidate in used:
            candidate, k = f"{base}#{k}", k + 1
        used.add(candidate)
        ids.append(candidate)
    return ids


def model_name(name_or_path: str) -> str:
    """A folder name for a model: `builtin-tiny`, `Qwen2-VL-2B-Instruct`, `run-checkpoint-100` (generic last
    folders such as checkpoint-N keep their run folder's name in front)."""
    if name_or_path.startswith("builtin:"):
        parts = ["builtin", name_or_path.split(":", 1)[1]]
    else:
        local = Path(name_or_path).expanduser()
        parts = [p for p in (local.resolve() if local.exists() else local).parts if p not in ("/", "\\", ".", "")]
    parts = parts or ["model"]
    keep = 2 if len(parts) > 1 and (_GENERIC_NAME.fullmatch(parts[-1]) or parts[0] == "builtin") else 1
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts[-keep:])).strip("._") or "model"


def unique_model_names(models: Sequence[str]) -> list[str]:
    """`model_name` of each model, with -2, -3, ... where two would share a folder."""
    names: list[str] = []
    for model in models:
        base = name = model_name(model)
        k = 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names
