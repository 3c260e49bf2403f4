"""A multi-process verb destroys its process group before the interpreter exits.

Without it, gloo's worker threads outlive Python's finalisation and a rank that finished its work can die with
`terminate called without an active exception` (SIGABRT): 12 of 20 two-rank runs of a few collectives on this
machine (pytorch#190489). Destroying is not enough once a model module was imported with the group open (see
gpg_vl/distributed.py): that is what failed a ZeRO-2 test in CI and 4 of 10 runs of the two-rank eval test."""

import os
import subprocess
import sys

import pytest
import torch.distributed as dist

from gpg_vl import cli, trainer
from gpg_vl.config import ConfigError


@pytest.fixture
def opens_a_group(monkeypatch, tmp_path):
    """`gpg-vl train` replaced by a run that opens a gloo group, then returns or raises `outcome`; launched as
    one of two ranks would be (WORLD_SIZE=2; the group itself has one rank, so it needs no second process)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    def install(outcome):
        def run(args):
            dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
            if isinstance(outcome, Exception):
                raise outcome
            return outcome
        monkeypatch.setattr(trainer, "run", run)
    yield install
    if dist.is_initialized():
        dist.destroy_process_group()


def test_the_group_is_destroyed_after_a_run_that_succeeds(opens_a_group):
    opens_a_group(0)
    assert cli.main(["train"]) == 0
    assert not dist.is_initialized()


def test_the_group_is_destroyed_after_an_error_the_cli_reports(opens_a_group):
    opens_a_group(ConfigError("train.max_steps: must be positive"))
    assert cli.main(["train"]) == 2
    assert not dist.is_initialized()


def test_a_one_process_run_leaves_its_group_to_whoever_opened_it(opens_a_group, monkeypatch):
    """vLLM's in-process engine opens a one-rank group and destroys it in its own shutdown, after `main`."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    opens_a_group(0)
    assert cli.main(["train"]) == 0
    assert dist.is_initialized()


def test_a_group_the_caller_opened_is_the_callers_to_end(opens_a_group, monkeypatch, tmp_path):
    """A script that opened the group and then calls `main` (as tests/test_generation.py does) goes on using it."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'caller-store'}", rank=0, world_size=1)
    monkeypatch.setattr(trainer, "run", lambda args: 0)  # the group is already open
    assert cli.main(["train"]) == 0
    assert dist.is_initialized()


def test_an_unexpected_error_leaves_the_group_alone(opens_a_group):
    """Another rank may still sit in a collective: destroying could hang it, so the error just propagates."""
    opens_a_group(RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["train"])
    assert dist.is_initialized()


THREADS_AFTER_END = """
import os, sys
import gpg_vl.distributed  # as every verb does before its process group exists
import torch.distributed as dist
from gpg_vl.cli import end_process_group

def threads():
    return len(os.listdir("/proc/self/task"))

before = threads()
os.environ["WORLD_SIZE"] = "2"  # as under torchrun; the group itself has one rank
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
dist.all_gather_object([None], 0)
import transformers.models.qwen2_vl.modeling_qwen2_vl  # imports torch's FSDP, as loading a model does
end_process_group()
print(threads() - before)
"""


def test_ending_the_group_stops_its_worker_threads_after_a_model_module_was_imported(tmp_path):
    """The group's gloo threads are gone once `end_process_group` returns, even though a model module was
    imported while the group was open (that import used to keep the group alive through default arguments
    of torch.distributed.nn: the threads then ran into the interpreter's finalisation)."""
    script = tmp_path / "end.py"
    script.write_text(THREADS_AFTER_END)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "store")], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == "0", f"threads left running: {proc.stdout.split()[-1]}"


ENTRY_AFTER_SUCCESS = """
import atexit, sys
import torch.distributed as dist
from gpg_vl import cli, trainer

store = sys.argv[1]

def run(args):
    dist.init_process_group("gloo", init_method="file://" + store, rank=0, world_size=1)
    return 0

class Finalised:
    def __del__(self):
        print("finalised", flush=True)  # runs when the interpreter finalises its modules

kept = Finalised()
trainer.run = run
atexit.register(lambda: print("exit handler ran", flush=True))
sys.argv = ["gpg-vl", "train"]
cli.entry()
print("not reached")
"""


def test_a_finished_rank_ends_after_its_exit_handlers_without_finalising(tmp_path):
    """`gpg-vl` (cli.entry) on a rank of a multi-process launch whose run succeeded: Python's exit handlers run,
    the exit status is 0, and the process ends there (os._exit), before the interpreter's finalisation."""
    script = tmp_path / "entry.py"
    script.write_text(ENTRY_AFTER_SUCCESS)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "store")], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "exit handler ran" in proc.stdout and "not reached" not in proc.stdout
    assert "finalised" not in proc.stdout  # ended before the interpreter's finalisation
