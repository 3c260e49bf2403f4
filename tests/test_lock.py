"""One run per folder (gpg_vl/runlock.py): while a run holds its folder's lock, a second start there, even
with train.overwrite=true, refuses with one line naming the holder's PID and host and deletes nothing; the
lock of a run killed with -9 is stale, taken over by the next start, and the takeover is printed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import args_for

from gpg_vl import cli
from gpg_vl.runlock import LOCK_NAME


def start_run(model_dir, out: Path, steps: int = 500) -> subprocess.Popen:
    """A real `gpg-vl train` process on the folder; returns once it holds the lock (its PID in the file)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = args_for(model_dir, out, f"train.max_steps={steps}", "logging.sample_every=0")
    proc = subprocess.Popen([sys.executable, "-m", "gpg_vl.cli", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lock = out / LOCK_NAME
    for _ in range(1200):
        if lock.exists() and lock.read_text().split()[1:] == [str(proc.pid)]:
            return proc
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("the run never took its lock")


def test_a_second_run_in_a_running_folder_refuses_naming_the_holder(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    first = start_run(tiny_model_dir, out)
    try:
        while not (out / "config.yaml").exists():  # the first run has written into the folder
            assert first.poll() is None, first.stderr.read().decode()
            time.sleep(0.1)
        code = cli.main(args_for(tiny_model_dir, out, "train.overwrite=true"))
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert code == 2
        assert line == (f"gpg-vl train: error: {out} is in use by another run (PID {first.pid} on host {socket.gethostname()}, "
                        f"lock file {out / LOCK_NAME}); wait for it to end, or choose another train.output_dir"), line
        assert (out / "config.yaml").exists() and first.poll() is None  # nothing deleted, the first run goes on
    finally:
        first.kill()
        first.wait()


def test_a_start_after_kill_9_takes_over_the_stale_lock_and_says_so(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    first = start_run(tiny_model_dir, out)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert (out / LOCK_NAME).read_text().split() == [socket.gethostname(), str(first.pid)]  # left behind
    code = cli.main(args_for(tiny_model_dir, out, "train.overwrite=true", "train.max_steps=1"))
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"{out}: took over the stale lock of PID {first.pid} on {socket.gethostname()} (that process is gone)" in err
    assert not (out / LOCK_NAME).exists()  # released when the run ended


def test_an_unwritable_folder_fails_before_loading_with_one_line(tiny_model_dir, capsys):
    """/sys refuses mkdir even to root (chmod does not stop root), so this really fails on a root CI too."""
    out = Path("/sys/gpg-vl-run")
    if not Path("/sys").is_dir():
        import pytest

        pytest.skip("no /sys on this system")
    code = cli.main(args_for(tiny_model_dir / "missing-model", out))  # the model would fail to load: never reached
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert line.startswith(f"gpg-vl train: error: train.output_dir={out} cannot be written: ") and "(errno " in line, line
