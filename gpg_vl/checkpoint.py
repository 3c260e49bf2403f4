"""Training checkpoints and the run folder they live in (atomic writes through gpg_vl.atomic).

A folder or file appears complete under its final name, or not at all: saving writes a `.tmp-*` sibling and
renames it into place; pruning renames a checkpoint out of the `checkpoint-N` namespace before deleting it.
A crash therefore leaves only hidden leftovers, which `prepare_run_dir` removes at the next start. That
function also keeps runs from mixing: a fresh run refuses a folder that already holds one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
import uuid
from pathlib import Path

from gpg_vl.atomic import atomic_dir, atomic_write_text  # noqa: F401 (atomic_write_text: re-exported for callers)
from gpg_vl.errors import ConfigError


# ---- training checkpoints ------------------------------------------------------------------------

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.pt"
PRUNED_PREFIX = ".pruned-"
# Hidden names only our own saves, prunes and overwrites create; anything else in a run folder is left alone.
SHARDS_DIR = "optimizer-shards"  # DeepSpeed: one optimizer state per rank (rank{r}.pt)


def shards_staging_dir(output_dir: str | Path, step: int) -> Path:
    """Where every rank writes its optimizer shard before the main process saves checkpoint-`step`."""
    return Path(output_dir) / f".tmp-{CHECKPOINT_PREFIX}{step}-shards"


LEFTOVER_PREFIXES = (
    f".tmp-{CHECKPOINT_PREFIX}", f".old-{CHECKPOINT_PREFIX}", f"{PRUNED_PREFIX}{CHECKPOINT_PREFIX}",
    ".tmp-metrics.jsonl-", ".tmp-samples.jsonl-", ".overwritten-",
)
# What a training run writes into its folder (besides checkpoint-N/); finding any means an earlier run is there.
RUN_FILES = ("config.yaml", "metrics.jsonl", "samples.jsonl", "samples", "tb", "wandb")
LOW_DISK_BYTES = 1 << 20  # free space under this right after a failed write is read as "disk full"


class CheckpointError(RuntimeError):
    """A checkpoint or run folder that is missing, incomplete, unreadable, unwritable or already in use."""


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX) :])


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first (temporary `.tmp-*` folders are ignored)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if p.name[len(CHECKPOINT_PREFIX) :].isdigit()]
    return sorted(found, key=checkpoint_step)


def save_checkpoint(folder: str | Path, model, processor, state: dict, keep_last: int, state_dict=None, staged: Path | None = None) -> Path:
    """Write `folder` atomically: HF model + processor files + trainer_state.pt; prune to the newest K.

    `staged`: a folder other processes already wrote (DeepSpeed's per-rank optimizer shards), moved in whole
    as `SHARDS_DIR` before the rename, so it is part of the checkpoint or of nothing.

    A full disk or a read-only folder raises a one-line CheckpointError; the earlier checkpoints are intact."""
    import torch

    folder = Path(folder)
    try:
        with atomic_dir(folder) as tmp:
            try:
                model.save_pretrained(tmp, state_dict=state_dict)
                processor.save_pretrained(tmp)
                torch.save(state, tmp / STATE_FILE)
                if staged is not None:
                    os.replace(staged, tmp / SHARDS_DIR)
            except Exception as e:
                # diagnosed here, while the partial files still fill the disk; atomic_dir then removes them
                reason = _disk_reason(e, tmp)
                if reason is None:
                    raise
                raise OSError(errno.EIO, reason) from e
    except OSError as e:
        reason = e.strerror or str(e)
        raise CheckpointError(_one_line(f"could not save {folder.name} in {folder.parent}: {reason}; {_last_good(folder)}")) from None
    prune_checkpoints(folder.parent, keep_last, newest=folder)
    return folder


def _disk_reason(error: Exception, folder: Path) -> str | None:
    """Why a write failed, when the disk is the cause. torch.save reports a full disk only as an opaque
    RuntimeError ("unexpected pos ..."), so the free space left says it instead."""
    if isinstance(error, OSError):
        return error.strerror or str(error)
    text = str(error)
    for code in (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EIO):
        if os.strerror(code) in text:
            return os.strerror(code)
    with contextlib.suppress(OSError):
        if shutil.disk_usage(folder).free < LOW_DISK_BYTES:
            return f"{os.strerror(errno.ENOSPC)} ({type(error).__name__}: {text})"
    return None


def _last_good(folder: Path) -> str:
    older = [p for p in list_checkpoints(folder.parent) if p != folder]
    if folder.is_dir():
        return f"{folder} (the earlier save of this step) is intact"
    return f"the last good checkpoint, {older[-1]}, is intact" if older else "no earlier checkpoint exists"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def prune_checkpoints(output_dir: str | Path, keep_last: int, newest: Path) -> None:
    """Keep the newest `keep_last` checkpoints up to and including `newest` (never `newest` itself).

    Each older one is first renamed out of the checkpoint namespace (one atomic rename), then deleted, so a
    crash mid-delete leaves a `.pruned-*` folder for the next start to remove, never a `checkpoint-N` with
    its weights or trainer state missing."""
    if keep_last <= 0:
        return
    older = [p for p in list_checkpoints(output_dir) if checkpoint_step(p) <= checkpoint_step(newest) and p != newest]
    for old in older[: max(0, len(older) - (keep_last - 1))]:
        doomed = old.with_name(f"{PRUNED_PREFIX}{old.name}-{uuid.uuid4().hex[:8]}")
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


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
        return torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False, mmap=True)  # mmap: pages read on use
    except Exception as e:
        raise CheckpointError(f"{folder / STATE_FILE} is unreadable ({type(e).__name__}: {e})") from None


# ---- the run folder ------------------------------------------------------------------------------


def check_output_dir(output_dir: str | Path) -> Path:
    """Refuse an output_dir that is empty, the filesystem root, the home folder, or a file (or under one)."""
    if not str(output_dir).strip():
        raise ConfigError("train.output_dir is empty; name a folder for the run", key="train.output_dir")
    path = Path(output_dir).resolve()
    if path == Path(path.anchor):
        raise ConfigError(f"train.output_dir={output_dir} is the filesystem root; name a folder for the run", key="train.output_dir")
    if path == Path.home().resolve():
        raise ConfigError(f"train.output_dir={output_dir} is the home folder; name a folder for the run", key="train.output_dir")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == path else f"is inside {existing}, which is a file"
        raise ConfigError(f"train.output_dir={output_dir} {where}, not a folder", key="train.output_dir")
    return path


def earlier_run_files(output_dir: str | Path) -> list[str]:
    """Names in `output_dir` that a training run wrote (leftover temporaries do not count)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    return [n for n in RUN_FILES if (folder / n).exists()] + [p.name for p in list_checkpoints(folder)]


def remove_leftovers(output_dir: str | Path) -> list[str]:
    """Delete our own temporaries from interrupted saves, prunes and overwrites; returns their names.

    The one leftover worth keeping is an `.old-checkpoint-N-*` whose `checkpoint-N` is missing: a crash hit
    between the two renames of a re-save, and it is the last complete copy, so it is renamed back."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.iterdir()):
        if not path.name.startswith(LEFTOVER_PREFIXES):
            continue
        if path.name.startswith(f".old-{CHECKPOINT_PREFIX}"):
            final = folder / path.name[len(".old-") :].rsplit("-", 1)[0]
            if not final.exists():
                os.replace(path, final)
                continue
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        removed.append(path.name)
    return removed


def prepare_run_dir(output_dir: str | Path, resume: str | None, overwrite: bool, is_main: bool = True) -> Path | None:
    """Check and tidy the run folder before anything is written; return the checkpoint to resume from.

    - a fresh run refuses a folder that holds an earlier run, unless `overwrite`, which deletes that run's
      files (moved into one hidden `.overwritten-*` folder first, so a crash cannot leave half of them
      looking like a run) and leaves everything else in the folder alone. Resuming from a checkpoint
      outside the folder counts as a fresh run of this folder;
    - continuing the folder's own run refuses when it holds checkpoints newer than the one resumed from;
    - leftovers of interrupted saves and prunes are removed (main process only; every rank checks).
    """
    out = check_output_dir(output_dir)
    resume_dir = resolve_resume(resume, output_dir) if resume else None
    if resume_dir is not None and out in resume_dir.resolve().parents:
        if overwrite:
            raise ConfigError(f"train.overwrite=true would delete {resume_dir}, the checkpoint to resume from; drop one of the two", key="train.overwrite")
        if resume_dir.name[len(CHECKPOINT_PREFIX) :].isdigit():
            newer = [p.name for p in list_checkpoints(out) if checkpoint_step(p) > checkpoint_step(resume_dir)]
            if newer:
                raise CheckpointError(
                    f"{output_dir} holds {', '.join(newer)}, newer than {resume_dir.name} that you resume from; "
                    f"move them out of the folder, or resume into a new train.output_dir"
                )
    else:
        found = earlier_run_files(out)
        if found and not overwrite:
            shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
            raise CheckpointError(
                f"{output_dir} already holds a run ({shown}); continue it with --resume, choose a new "
                f"train.output_dir, or set train.overwrite=true to delete it"
            )
        if found and is_main:
            _delete_run(out, found)
            print(f"train.overwrite=true: deleted the earlier run in {output_dir} ({', '.join(found)})", file=sys.stderr)
    if is_main:
        remove_leftovers(out)
    return resume_dir


def _delete_run(folder: Path, names: list[str]) -> None:
    trash = folder / f".overwritten-{uuid.uuid4().hex[:8]}"
    trash.mkdir()
    for name in names:
        os.replace(folder / name, trash / name)
    shutil.rmtree(trash, ignore_errors=True)
