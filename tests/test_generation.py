"""Evaluation split across processes: each rank generates one contiguous slice, the slices come back in
order, and the metrics equal a single process's. The 2-process checks run for real under torchrun over gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import free_port
from gpg_vl.cli import main
from gpg_vl.config import load_config
from gpg_vl.generation import gather_to_all, shard_bounds

SHAPES = ["--task", "shapes", "--task-option", "questions=[color, shape]", "--data", "synthetic:7"]
EVAL_ARGS = [*SHAPES, "--batch-size", "2", "--max-new-tokens", "6"]


def test_shards_cover_every_item_once_in_order():
    for count in range(10):
        for world in range(1, 5):
            bounds = [shard_bounds(count, rank, world) for rank in range(world)]
            assert [i for start, stop in bounds for i in range(start, stop)] == list(range(count))
            sizes = [stop - start for start, stop in bounds]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)  # the extra ones go first
    assert shard_bounds(7, 0, 2) == (0, 4) and shard_bounds(7, 1, 2) == (4, 7)
    with pytest.raises(ValueError, match="rank 2 is outside a world of 2"):
        shard_bounds(7, 2, 2)


def test_gather_needs_a_process_group_beyond_one_process():
    assert gather_to_all([1, 2], world=1) == [1, 2]
    with pytest.raises(RuntimeError, match="needs an initialised torch.distributed process group"):
        gather_to_all([1, 2], world=2)


# Run by torchrun in two processes. It records, per rank, which examples the engine was asked about (by the
# example's image), then (a) runs the trainer's held-out evaluation with the real HF engine on the tiny model,
# one prompt per generate call so that batch padding cannot change a greedy completion, and (b) `gpg-vl eval`.
SCRIPT = """
import json, sys
from pathlib import Path

from accelerate import PartialState

state = PartialState(cpu=True)
rank, world = state.process_index, state.num_processes
out, model_dir, eval_args = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])

from gpg_vl.cli import main
from gpg_vl.config import load_config
from gpg_vl.images import message_images
from gpg_vl.modeling import load_policy
from gpg_vl.registry import get_task
from gpg_vl.rollout import make_engine
from gpg_vl.rollout.hf import HFEngine
from gpg_vl.trainer import evaluate_heldout

task = get_task("shapes", questions=["color", "shape"])
examples = task.load("synthetic:7", "test")
index_of = {e["image"].tobytes(): i for i, e in enumerate(examples)}
seen = []
generate = HFEngine.generate
def spy(self, prompts, params):
    seen.extend(index_of[message_images(p)[0].tobytes()] for p in prompts)
    return generate(self, prompts, params)
HFEngine.generate = spy
scored = []  # every call of task.metrics on this rank: [(example id, completion)]
metrics_of = type(task).metrics
def count(self, examples, completions):
    scored.append([(e["id"], c) for e, c in zip(examples, completions)])
    return metrics_of(self, examples, completions)
type(task).metrics = count

cfg = load_config(None, [f"model.name_or_path={model_dir}", "eval.batch_size=1", "eval.max_new_tokens=6"])
model, processor = load_policy(cfg.model, "cpu")
task.configure_images(processor.budget)
engine = make_engine("hf", model, processor, cfg.rollout, cfg.model)
metrics = evaluate_heldout(task, engine, examples, cfg, rank, world)
trainer_seen, trainer_scored, seen[:] = list(seen), list(scored), []

rc = main(["eval", "--model", model_dir, "--output", str(out / "eval"), *eval_args])
(out / f"rank{rank}.json").write_text(json.dumps({"metrics": metrics, "seen": trainer_seen, "scored": trainer_scored, "eval_seen": seen, "rc": rc}))
"""


@pytest.fixture(scope="module")
def two_ranks(tiny_model_dir, tmp_path_factory):
    """What each of two real processes (torchrun, gloo) generated and computed."""
    out = tmp_path_factory.mktemp("two-ranks")
    script = out / "two_ranks.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(script), str(out), str(tiny_model_dir), json.dumps(EVAL_ARGS)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_trainer_eval_split_across_two_ranks_equals_one_process(two_ranks, tiny_model_dir, monkeypatch):
    from gpg_vl.modeling import load_policy
    from gpg_vl.registry import get_task
    from gpg_vl.rollout import make_engine
    from gpg_vl.trainer import evaluate_heldout

    _, ranks = two_ranks
    assert ranks[0]["seen"] == [0, 1, 2, 3] and ranks[1]["seen"] == [4, 5, 6]  # 7 examples: slices of 4 and 3
    task = get_task("shapes", questions=["color", "shape"])
    examples = task.load("synthetic:7", "test")
    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", "eval.batch_size=1", "eval.max_new_tokens=6"])
    model, processor = load_policy(cfg.model, "cpu")
    task.configure_images(processor.budget)
    engine = make_engine("hf", model, processor, cfg.rollout, cfg.model)
    scored = []
    metrics_of = type(task).metrics

    def count(self, examples, completions):
        scored.append([[e["id"], c] for e, c in zip(examples, completions)])
        return metrics_of(self, examples, completions)

    monkeypatch.setattr(type(task), "metrics", count)
    alone = evaluate_heldout(task, engine, examples, cfg)
    assert set(alone) >= {"accuracy", "format", "accuracy/color", "accuracy/shape"}
    assert ranks[0]["metrics"] == ranks[1]["metrics"] == alone
    # scored once, by rank 0, on all 7 completions in the original order, the very ones one process makes
    assert ranks[0]["scored"] == scored and len(scored) == 1 and len(scored[0]) == 7 and ranks[1]["scored"] == []


@pytest.mark.slow
def test_eval_verb_split_across_two_ranks_writes_what_one_process_writes(two_ranks, tiny_model_dir, tmp_path):
    out, ranks = two_ranks
    # --batch-size 2 over 2 ranks: rounds of 4 examples, rank 0 takes the first batch of each round
    assert ranks[0]["eval_seen"] == [0, 1, 4, 5] and ranks[1]["eval_seen"] == [2, 3, 6]
    assert ranks[0]["rc"] == ranks[1]["rc"] == 0
    assert main(["eval", "--model", str(tiny_model_dir), "--output", str(tmp_path), *EVAL_ARGS]) == 0
    for name in ("records.jsonl", "summary.json"):  # the same batches and seeds, so the same bytes
        assert (out / "eval" / "tiny" / name).read_text() == (tmp_path / "tiny" / name).read_text(), name
    assert len((tmp_path / "tiny" / "records.jsonl").read_text().splitlines()) == 7
