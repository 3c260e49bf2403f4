"""The run folder cannot mix or rot: a fresh run refuses an earlier run's folder (or deletes it on request),
dangerous output_dirs are refused, pruning never leaves an incomplete checkpoint-N, leftovers are cleaned,
a full or read-only disk keeps the last good checkpoint, every log is trimmed on resume, and the checkpoint
is saved before the held-out evaluation."""

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gpg_vl import atomic, checkpoint
from gpg_vl.checkpoint import (
    CheckpointError,
    list_checkpoints,
    prepare_run_dir,
    remove_leftovers,
    save_checkpoint,
)
from gpg_vl.cli import main
from gpg_vl.config import ConfigError
from gpg_vl.logger import RunLogger
from conftest import args_for, rows, weights


def make_run(folder: Path, steps=(1, 2, 3)) -> Path:
    """An earlier run's files, in the real layout."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text("train: {}\n")
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 0.0}) + "\n" for s in steps))
    (folder / "tb").mkdir()
    for s in steps[-2:]:
        complete_checkpoint(folder / f"checkpoint-{s}")
    return folder


def complete_checkpoint(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", checkpoint.STATE_FILE):
        (folder / name).write_text(name)
    return folder


def is_complete(folder: Path) -> bool:
    return all((folder / n).is_file() for n in ("config.json", "model.safetensors", checkpoint.STATE_FILE))


# ---- a fresh run, overwrite, and refused output_dirs ---------------------------------------------


def test_fresh_run_refuses_an_earlier_runs_folder_in_one_line(tmp_path):
    run = make_run(tmp_path / "run")
    with pytest.raises(CheckpointError) as e:
        prepare_run_dir(run, resume=None, overwrite=False)
    message = str(e.value)
    assert "\n" not in message and "metrics.jsonl" in message and "checkpoint-3" in message
    assert "--resume" in message and "train.output_dir" in message and "train.overwrite=true" in message
    assert (run / "metrics.jsonl").read_text().count("\n") == 3  # nothing was touched


def test_fresh_run_accepts_a_new_or_unrelated_folder(tmp_path):
    assert prepare_run_dir(tmp_path / "new", resume=None, overwrite=False) is None
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.txt").write_text("mine")
    assert prepare_run_dir(tmp_path / "notes", resume=None, overwrite=False) is None


def test_overwrite_deletes_the_earlier_run_and_nothing_else(tmp_path):
    run = make_run(tmp_path / "run")
    (run / "notes.txt").write_text("not a run file")
    (run / ".tmp-checkpoint-4-x").mkdir()  # a leftover of the earlier run's crashed save
    prepare_run_dir(run, resume=None, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("where", ["root", "home", "file", "under-file", "empty"])
def test_dangerous_output_dirs_are_refused_in_one_line(tmp_path, where):
    (tmp_path / "a-file").write_text("x")
    path = {"root": "/", "home": str(Path.home()), "file": str(tmp_path / "a-file"),
            "under-file": str(tmp_path / "a-file" / "run"), "empty": ""}[where]
    with pytest.raises(ConfigError) as e:
        prepare_run_dir(path, resume=None, overwrite=True)  # overwrite must not make / acceptable
    assert "train.output_dir" in str(e.value) and "\n" not in str(e.value)


def test_cli_refusals_exit_2_with_one_line(tiny_model_dir, tmp_path, capsys):
    run = make_run(tmp_path / "run")
    assert main(args_for(tiny_model_dir, run)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gpg-vl train: error:") and "already holds a run" in err and "\n" not in err
    assert main(args_for(tiny_model_dir, "/")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gpg-vl train: error:") and "filesystem root" in err and "\n" not in err


def test_cli_overwrite_replaces_the_earlier_run(tiny_model_dir, tmp_path):
    run = make_run(tmp_path / "run", steps=tuple(range(1, 10)))  # its checkpoints 8, 9 outnumber the new run's
    assert main(args_for(tiny_model_dir, run, "train.overwrite=true", "checkpoint.save_every=1", "checkpoint.keep_last=1")) == 0
    assert [r["step"] for r in rows(run)] == [1, 2]  # not 1..9, 1, 2
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-2"]  # its own checkpoint, not pruned away
    assert is_complete(run / "checkpoint-2") or (run / "checkpoint-2" / "model.safetensors").is_file()


# ---- resume checks and leftovers -----------------------------------------------------------------


def test_resume_cleans_leftovers_and_restores_an_orphaned_old_copy(tmp_path):
    run = make_run(tmp_path / "run", steps=(1, 2, 3, 6))
    shutil.rmtree(run / "checkpoint-3")
    leftovers = [".tmp-checkpoint-7-abc", ".pruned-checkpoint-2-0f0f", ".old-checkpoint-6-1234", ".tmp-metrics.jsonl-q1"]
    for name in leftovers:
        (run / name).mkdir() if "checkpoint" in name else (run / name).write_text("{")
    complete_checkpoint(run / ".old-checkpoint-5-beef")  # a kill between the two renames of re-saving step 5
    (run / ".tmp-other-thing").mkdir()  # not ours: kept
    assert prepare_run_dir(run, resume="latest", overwrite=False) == run / "checkpoint-6"
    names = sorted(p.name for p in run.iterdir())
    assert not [n for n in names if n in leftovers]
    assert is_complete(run / "checkpoint-5") and ".tmp-other-thing" in names


def test_resume_from_an_older_checkpoint_refuses_newer_ones(tmp_path):
    run = make_run(tmp_path / "run", steps=(1, 2, 3, 4, 6))
    with pytest.raises(CheckpointError, match="holds checkpoint-6, newer than checkpoint-4"):
        prepare_run_dir(run, resume=str(run / "checkpoint-4"), overwrite=False)


def test_overwrite_never_deletes_the_checkpoint_resumed_from(tmp_path):
    run = make_run(tmp_path / "run")
    with pytest.raises(ConfigError, match="would delete"):
        prepare_run_dir(run, resume="latest", overwrite=True)
    # resuming another folder's checkpoint is a fresh run of this folder: refused, or replaces it on request
    other = make_run(tmp_path / "other")
    with pytest.raises(CheckpointError, match="already holds a run"):
        prepare_run_dir(other, resume=str(run / "checkpoint-3"), overwrite=False)
    assert prepare_run_dir(other, resume=str(run / "checkpoint-3"), overwrite=True) == run / "checkpoint-3"
    assert list(other.iterdir()) == [] and is_complete(run / "checkpoint-3")


# ---- saving and pruning --------------------------------------------------------------------------


class FakeModel:
    """Writes what a Hugging Face model and processor write, without building one."""

    def save_pretrained(self, folder, state_dict=None):
        (Path(folder) / "config.json").write_text("{}")
        (Path(folder) / "model.safetensors").write_bytes(b"\0" * 64)


def test_prune_renames_out_of_the_namespace_before_deleting(tmp_path, monkeypatch):
    for step in (1, 2):
        save_checkpoint(tmp_path / f"checkpoint-{step}", FakeModel(), FakeModel(), {"step": step}, keep_last=2)
    real_rmtree = shutil.rmtree

    def killed_mid_delete(path, ignore_errors=False):
        path = Path(path)
        # every checkpoint-N that still exists while one is being deleted is complete
        assert path.name.startswith(".pruned-checkpoint-1-"), path.name
        assert all(is_complete(p) for p in list_checkpoints(tmp_path))
        (path / checkpoint.STATE_FILE).unlink()  # half deleted, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_mid_delete)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "checkpoint-3", FakeModel(), FakeModel(), {"step": 3}, keep_last=2)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert all(is_complete(p) for p in list_checkpoints(tmp_path))
    assert remove_leftovers(tmp_path)[0].startswith(".pruned-checkpoint-1-")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3"]


def test_prune_never_deletes_the_checkpoint_just_saved(tmp_path):
    for step in (7, 8):  # higher numbers than the run that saves next
        complete_checkpoint(tmp_path / f"checkpoint-{step}")
    for step in (1, 2, 3):
        save_checkpoint(tmp_path / f"checkpoint-{step}", FakeModel(), FakeModel(), {"step": step}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3", "checkpoint-7", "checkpoint-8"]


def failing_torch_save(error):
    def save(obj, path, *a, **k):
        Path(path).write_bytes(b"half")
        raise error

    return save


@pytest.mark.parametrize("error, reason", [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "No space left on device"),
    (OSError(errno.EROFS, os.strerror(errno.EROFS)), "Read-only file system"),
])
def test_disk_full_or_read_only_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, error, reason):
    save_checkpoint(tmp_path / "checkpoint-1", FakeModel(), FakeModel(), {"step": 1}, keep_last=1)
    monkeypatch.setattr(torch, "save", failing_torch_save(error))
    with pytest.raises(CheckpointError) as e:
        save_checkpoint(tmp_path / "checkpoint-2", FakeModel(), FakeModel(), {"step": 2}, keep_last=1)
    message = str(e.value)
    assert "\n" not in message and reason in message and "checkpoint-1, is intact" in message
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-1"] and is_complete(tmp_path / "checkpoint-1")


def test_read_only_folder_fails_before_writing(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "checkpoint-1", FakeModel(), FakeModel(), {"step": 1}, keep_last=1)

    def read_only(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(atomic.tempfile, "mkdtemp", read_only)
    with pytest.raises(CheckpointError, match="could not save checkpoint-2 .*Read-only file system; the last good"):
        save_checkpoint(tmp_path / "checkpoint-2", FakeModel(), FakeModel(), {"step": 2}, keep_last=1)


def test_opaque_write_error_on_a_full_disk_is_named_but_other_errors_are_not_disguised(tmp_path, monkeypatch):
    # torch.save reports a full disk only as "unexpected pos"; the free space left names the cause
    monkeypatch.setattr(torch, "save", failing_torch_save(RuntimeError("[enforce fail] unexpected pos 576 vs 534")))
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: SimpleNamespace(total=1 << 30, used=1 << 30, free=0))
    with pytest.raises(CheckpointError, match="No space left on device .*no earlier checkpoint exists"):
        save_checkpoint(tmp_path / "checkpoint-1", FakeModel(), FakeModel(), {"step": 1}, keep_last=1)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: SimpleNamespace(total=1 << 40, used=0, free=1 << 40))
    with pytest.raises(RuntimeError, match="unexpected pos") as e:  # a bug stays a bug, with its traceback
        save_checkpoint(tmp_path / "checkpoint-1", FakeModel(), FakeModel(), {"step": 1}, keep_last=1)
    assert not isinstance(e.value, CheckpointError) and list(tmp_path.iterdir()) == []


def test_a_really_full_disk(tmp_path):
    """A 4 MiB tmpfs: torch.save's real error, not a monkeypatched one (needs the right to mount)."""
    disk = tmp_path / "small"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        save_checkpoint(disk / "checkpoint-1", FakeModel(), FakeModel(), {"step": 1}, keep_last=1)
        big = {"step": 2, "optimizer": torch.zeros(1 << 21)}  # 8 MiB of state on a 4 MiB disk
        with pytest.raises(CheckpointError) as e:
            save_checkpoint(disk / "checkpoint-2", FakeModel(), FakeModel(), big, keep_last=1)
        assert "No space left on device" in str(e.value) and "\n" not in str(e.value), str(e.value)
        assert [p.name for p in disk.iterdir()] == ["checkpoint-1"] and is_complete(disk / "checkpoint-1")
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)  # a failed writer may still hold a file


def test_cli_disk_full_stops_with_one_line_and_keeps_the_last_checkpoint(tiny_model_dir, tmp_path, monkeypatch, capsys):
    real_save, calls = torch.save, []

    def full_on_second_checkpoint(obj, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", full_on_second_checkpoint)
    out = tmp_path / "run"
    assert main(args_for(tiny_model_dir, out, "checkpoint.save_every=1", "checkpoint.keep_last=1")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # earlier lines: model-loading progress bars
    assert err.startswith("gpg-vl train: error: could not save checkpoint-2")
    assert "No space left on device" in err and "checkpoint-1, is intact" in err
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


# ---- logs on resume ------------------------------------------------------------------------------


def logging_cfg(tensorboard=False):
    return SimpleNamespace(logging=SimpleNamespace(tensorboard=tensorboard, wandb=False, progress_bar=False, log_every=1))


def write_lines(path: Path, steps, torn: str = "") -> None:
    path.write_text("".join(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in steps) + torn)


def steps_in(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_resume_trims_every_log_and_drops_a_torn_line(tmp_path):
    write_lines(tmp_path / "metrics.jsonl", [1, 2, 3, 4, 5], torn='{"step": 6, "lo')
    write_lines(tmp_path / "samples.jsonl", [1, 2, 2, 3, 4, 4, 5], torn='{"step": 5, "prompt": "wh')
    (tmp_path / "samples").mkdir()
    for s in (1, 4):
        (tmp_path / "samples" / f"step-{s:06d}-0.png").write_bytes(b"png")
    logger = RunLogger(logging_cfg(), tmp_path, True, 10, initial_step=3)
    assert steps_in(tmp_path / "metrics.jsonl") == [1, 2, 3]
    assert steps_in(tmp_path / "samples.jsonl") == [1, 2, 2, 3]
    assert [p.name for p in (tmp_path / "samples").iterdir()] == ["step-000001-0.png"]
    logger.log(4, {"loss": 4.0})
    assert steps_in(tmp_path / "metrics.jsonl") == [1, 2, 3, 4]


def test_resume_puts_back_the_checkpoint_steps_line(tmp_path):
    write_lines(tmp_path / "metrics.jsonl", [1, 2], torn='{"step": 3, "loss"')  # killed while writing step 3
    RunLogger(logging_cfg(), tmp_path, True, 10, initial_step=3, resume_line={"loss": 3.0, "reward_mean": 0.5})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert steps_in(tmp_path / "metrics.jsonl") == [1, 2, 3]
    assert lines[-1].startswith('{"step": 3') and json.loads(lines[-1])["reward_mean"] == 0.5
    # a line already there wins over the checkpoint's copy (it may hold eval/ metrics the copy lacks)
    RunLogger(logging_cfg(), tmp_path, True, 10, initial_step=3, resume_line={"loss": -1.0})
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["loss"] == 3.0


def test_a_damaged_line_in_the_middle_is_an_error_naming_it(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(CheckpointError, match=r"metrics.jsonl:2 is not a JSON object"):
        RunLogger(logging_cfg(), tmp_path, True, 10, initial_step=2)


def test_tensorboard_forgets_the_steps_after_the_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = RunLogger(logging_cfg(tensorboard=True), tmp_path, True, 5)
    for s in range(1, 6):
        first.log(s, {"loss": float(s)})
    first.close()
    resumed = RunLogger(logging_cfg(tensorboard=True), tmp_path, True, 5, initial_step=3)
    for s in (4, 5):
        resumed.log(s, {"loss": 10.0 * s})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]


# ---- save before evaluating ----------------------------------------------------------------------


def test_checkpoint_is_saved_before_eval_and_a_crash_in_eval_loses_no_step(tiny_model_dir, tmp_path, monkeypatch):
    import gpg_vl.trainer as trainer

    extra = ("train.max_steps=4", "checkpoint.save_every=2", "eval.every=2", "task.eval_data=synthetic:4", "eval.batch_size=4")
    assert main(args_for(tiny_model_dir, tmp_path / "straight", *extra)) == 0
    real_eval = trainer.evaluate_heldout

    def out_of_memory(*a, **k):
        raise MemoryError("simulated OOM in eval")

    monkeypatch.setattr(trainer, "evaluate_heldout", out_of_memory)
    with pytest.raises(MemoryError):
        main(args_for(tiny_model_dir, tmp_path / "split", *extra))
    split = tmp_path / "split"
    assert [p.name for p in list_checkpoints(split)] == ["checkpoint-2"]  # saved before the eval that died
    assert steps_in(split / "metrics.jsonl") == [1]
    monkeypatch.setattr(trainer, "evaluate_heldout", real_eval)
    assert main(args_for(tiny_model_dir, split, *extra) + ["--resume"]) == 0
    log, straight = rows(split), rows(tmp_path / "straight")
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert "eval/accuracy" in straight[1] and "eval/accuracy" not in log[1]  # step 2's eval died with the OOM
    assert {k: v for k, v in log[1].items() if not k.endswith("time_s")} == {
        k: v for k, v in straight[1].items() if not k.startswith("eval/") and not k.endswith("time_s")}
    assert log[3]["eval/accuracy"] == straight[3]["eval/accuracy"]  # the line with eval metrics is kept
    a, b = weights(tmp_path / "straight/checkpoint-4"), weights(split / "checkpoint-4")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_eval_at_start_logs_the_untrained_policy_as_step_0_and_not_again_on_resume(tiny_model_dir, tmp_path):
    extra = ("train.max_steps=2", "checkpoint.save_every=1", "eval.at_start=true", "eval.at_end=false",
             "task.eval_data=synthetic:4", "eval.batch_size=4")
    out = tmp_path / "run"
    assert main(args_for(tiny_model_dir, out, *extra)) == 0
    log = rows(out)
    assert [r["step"] for r in log] == [0, 1, 2]
    assert set(log[0]) == {"step", "eval/accuracy", "eval/format", "eval/accuracy/color"}  # eval only, before any step
    assert all(not k.startswith("eval/") for r in log[1:] for k in r)
    assert main(args_for(tiny_model_dir, out, *extra, "train.max_steps=3") + ["--resume"]) == 0
    assert [r["step"] for r in rows(out)] == [0, 1, 2, 3]  # a resumed run does not evaluate its start again


def test_held_out_evaluation_does_not_change_training(tiny_model_dir, tmp_path):
    """Greedy evaluation draws no random numbers the rollouts use: a run evaluated every step trains exactly
    like one never evaluated (so runs with different eval.every are comparable step for step)."""
    extra = ("train.max_steps=3", "task.eval_data=synthetic:4", "eval.batch_size=4", "rollout.temperature=1.0")
    assert main(args_for(tiny_model_dir, tmp_path / "quiet", *extra, "eval.every=0", "eval.at_end=false")) == 0
    assert main(args_for(tiny_model_dir, tmp_path / "evaluated", *extra, "eval.every=1", "eval.at_start=true")) == 0
    quiet, evaluated = rows(tmp_path / "quiet"), [r for r in rows(tmp_path / "evaluated") if r["step"] > 0]
    assert [r["loss"] for r in quiet] == [r["loss"] for r in evaluated]
    assert all("eval/accuracy" in r for r in evaluated)
    a, b = weights(tmp_path / "quiet/checkpoint-3"), weights(tmp_path / "evaluated/checkpoint-3")
    assert all(torch.equal(a[k], b[k]) for k in a)
