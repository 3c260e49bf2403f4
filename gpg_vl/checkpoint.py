"""Atomic writes: a folder or file appears complete under its final name, or not at all.

A crash mid-save leaves a `.tmp-*` sibling behind, never a half-written checkpoint under a real name, so
the last good checkpoint is always intact.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_dir(target: str | Path):
    """Yield a temporary folder beside `target`; on success it replaces `target` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the final folder gets ordinary permissions
    try:
        yield tmp
        _fsync_tree(tmp)
        if target.exists():
            old = target.with_name(f".old-{target.name}-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file through a temporary sibling and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fsync_tree(folder: Path) -> None:
    for file in folder.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())


# ---- training checkpoints ------------------------------------------------------------------------

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.pt"


class CheckpointError(RuntimeError):
    """A checkpoint folder that is missing, incomplete or unreadable."""


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX) :])


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first (temporary `.tmp-*` folders are ignored)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if p.name[len(CHECKPOINT_PREFIX) :].isdigit()]
    return sorted(found, key=checkpoint_step)


def save_checkpoint(folder: str | Path, model, processor, state: dict, keep_last: int, state_dict=None) -> Path:
    """Write `folder` atomically: HF model + processor files + trainer_state.pt; prune to the newest K."""
    import torch

    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)
        processor.save_pretrained(tmp)
        torch.save(state, tmp / STATE_FILE)
    if keep_last > 0:
        for old in list_checkpoints(folder.parent)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def resolve_resume(resume: str, output_dir: str | Path) -> Path:
    """`latest` -> the newest checkpoint in output_dir; otherwise the given folder, checked."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise CheckpointError(f"resume=latest but {output_dir} holds no {CHECKPOINT_PREFIX}* folder")
        return found[-1]
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint to resume from not found: {resume}")
    return path


def load_trainer_state(folder: Path) -> dict:
    """The optimizer/scheduler/RNG/data state saved beside the weights, with a clear error if damaged."""
    import torch

    missing = [n for n in (STATE_FILE, "config.json") if not (folder / n).is_file()]
    if missing:
        raise CheckpointError(f"{folder} is not a complete gpg-vl checkpoint: missing {', '.join(missing)}")
    try:
        return torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{folder / STATE_FILE} is unreadable ({type(e).__name__}: {e})") from None
