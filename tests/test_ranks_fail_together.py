"""Ranks fail together: two real processes over gloo, where the model folder does not load on rank 1 only.

The fault is made at the process level, not in our code: a `sitecustomize.py` on PYTHONPATH moves rank 1 into
another working directory, where the relative `./tiny` is an incomplete copy of the model (its weights file
is missing). Every other path in the command is absolute. Both processes must end within seconds of each
other, with the same exit status and the same last line on stderr, and no traceback."""

import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import args_for, free_port

BOUND_S = 60  # start to the exit of both, on 2 shared cores: imports, rendezvous, a tiny model loaded once

SITECUSTOMIZE = """
import os
if os.environ.get("RANK") == "1" and os.environ.get("FAULT_CWD"):
    os.chdir(os.environ["FAULT_CWD"])  # rank 1 alone resolves relative paths elsewhere
"""


def launch_two(tmp_path, model_dir, argv):
    """Run `python -m gpg_vl.cli *argv` as ranks 0 and 1 of one gloo group (the variables torchrun sets), each
    with its own stderr; returns [(exit status, stderr)] per rank and the seconds until both had ended."""
    good, bad, hook = tmp_path / "good", tmp_path / "bad", tmp_path / "hook"
    for folder in (good, bad, hook):
        folder.mkdir()
    os.symlink(model_dir, good / "tiny")
    shutil.copytree(model_dir, bad / "tiny", ignore=shutil.ignore_patterns("*.safetensors"))  # no weights
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    port = free_port()
    procs, logs = [], []
    start = time.monotonic()
    for rank in (0, 1):
        env = {
            **os.environ, "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]),
            "FAULT_CWD": str(bad), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
        }  # fmt: skip
        logs.append(open(tmp_path / f"rank{rank}.err", "w+"))
        procs.append(subprocess.Popen([sys.executable, "-m", "gpg_vl.cli", *argv], cwd=good, env=env,
                                      stdout=subprocess.DEVNULL, stderr=logs[-1]))  # fmt: skip
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, 3 * BOUND_S - (time.monotonic() - start)))
    except subprocess.TimeoutExpired:
        pass  # a rank left waiting: reported below with what both wrote
    seconds = time.monotonic() - start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    results = []
    for proc, log in zip(procs, logs):
        log.seek(0)
        results.append((proc.returncode, log.read()))
        log.close()
    return results, seconds


def check_failed_together(results, seconds, verb: str, status: int, line_start: str):
    """Both ranks ended with `status` within BOUND_S, printing the same error, which starts with `line_start`."""
    (rc0, err0), (rc1, err1) = results
    assert rc0 == rc1 == status, f"exit statuses {rc0}, {rc1} after {seconds:.0f} s\nrank 0:\n{err0[-2000:]}\nrank 1:\n{err1[-2000:]}"
    assert seconds < BOUND_S, f"both ended only after {seconds:.0f} s"
    end0, end1 = error_text(err0, verb), error_text(err1, verb)  # the error line (and the advice under it)
    assert end0 == end1 and end0.startswith(line_start), (end0, end1)
    assert "Traceback" not in err0 + err1
    print(f"{verb}: both ranks ended with {status} in {seconds:.1f} s:\n{end0}")


def error_text(stderr: str, verb: str) -> str:
    """stderr from the first line our CLI wrote (`gpg-vl VERB: ...`) to the end."""
    lines = stderr.splitlines()
    first = next((i for i, line in enumerate(lines) if line.startswith(f"gpg-vl {verb}: ")), len(lines))
    return "\n".join(lines[first:])


@pytest.mark.slow
def test_train_model_that_does_not_load_on_one_rank_stops_both(tiny_model_dir, tmp_path):
    argv = args_for("./tiny", tmp_path / "run")  # model.name_or_path=./tiny, relative on purpose
    results, seconds = launch_two(tmp_path, tiny_model_dir, argv)
    check_failed_together(results, seconds, "train", 2, "gpg-vl train: error: rank 1 of 2: ")
    assert "./tiny" in results[0][1]
    assert not (tmp_path / "run" / ".gpg-vl.lock").exists()  # the main rank let the folder go


@pytest.mark.slow
def test_eval_model_that_does_not_load_on_one_rank_is_skipped_by_both(tiny_model_dir, tmp_path):
    argv = ["eval", "--task", "shapes", "--data", "synthetic:4", "--model", "./tiny", "--output", str(tmp_path / "eval"),
            "--max-new-tokens", "4"]  # fmt: skip
    results, seconds = launch_two(tmp_path, tiny_model_dir, argv)
    # as one process reports a model that does not load: it is not evaluated, exit 1 (the others would still be)
    check_failed_together(results, seconds, "eval", 1, "gpg-vl eval: model './tiny' (tiny) was not evaluated: rank 1 of 2: ")
    for _, err in results:
        assert err.rstrip().endswith("gpg-vl eval: 1 of 1 models not evaluated: tiny")
