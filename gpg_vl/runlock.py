"""One run per folder: a lock file (`.gpg-vl.lock`, holding host and PID) while a run trains in it.

Taken by the main process alone, before the folder is checked or tidied, so a second start (even with
train.overwrite=true) refuses with one line naming the holder. A lock whose process is dead on this host is
stale (a `kill -9`): it is taken over and the takeover is printed. Released at exit.
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
from pathlib import Path

from gpg_vl.checkpoint import CheckpointError

LOCK_NAME = ".gpg-vl.lock"
HELD: set[Path] = set()  # the locks this process holds (released at exit, or by release_held_locks)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def check_writable(folder: Path) -> None:
    """Create the folder and a probe file in it; an OSError becomes one line naming the folder (exit 2)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"train.output_dir={folder} cannot be written: {e.strerror or e} (errno {e.errno})") from None


def acquire_run_lock(folder: str | Path) -> Path:
    """Take the folder's lock for this process, or raise CheckpointError naming the live holder."""
    folder = Path(folder)
    check_writable(folder)
    lock, me = folder / LOCK_NAME, f"{socket.gethostname()} {os.getpid()}"
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                host, pid = lock.read_text().split()
            except (OSError, ValueError):  # removed meanwhile, or half-written by a starting run: look again
                continue
            if host == socket.gethostname() and (int(pid) == os.getpid() or not _alive(int(pid))):
                if int(pid) != os.getpid():
                    print(f"{folder}: took over the stale lock of PID {pid} on {host} (that process is gone)", file=sys.stderr)
                lock.unlink(missing_ok=True)
                continue
            raise CheckpointError(
                f"{folder} is in use by another run (PID {pid} on host {host}, lock file {lock}); "
                f"wait for it to end, or choose another train.output_dir"
            ) from None
        with os.fdopen(fd, "w") as f:
            f.write(me + "\n")
        if not HELD:
            atexit.register(release_held_locks)
        HELD.add(lock)
        return lock
    raise CheckpointError(f"{folder}: could not take the lock file {lock}; another run is starting in the folder")


def release_held_locks() -> None:
    """Release every lock this process holds: at exit, and when `train` returns or raises."""
    for lock in list(HELD):
        release_run_lock(lock)


def release_run_lock(lock: Path) -> None:
    """Remove the lock if this process still holds it."""
    HELD.discard(lock)
    try:
        if lock.read_text().split()[1] == str(os.getpid()):
            lock.unlink()
    except (OSError, IndexError):
        pass
