"""Atomic writes and checkpoint bookkeeping: a crash mid-save never damages the last good checkpoint."""

import pytest

from gpg_vl.checkpoint import CheckpointError, atomic_dir, atomic_write_text, list_checkpoints, resolve_resume


def test_crash_mid_save_leaves_previous_folder_intact(tmp_path):
    target = tmp_path / "checkpoint-2"
    with atomic_dir(target) as tmp:
        (tmp / "model.safetensors").write_text("good")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "model.safetensors").write_text("half-wri")
            raise RuntimeError("disk full")
    assert (target / "model.safetensors").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-2"]  # no temporary left behind


def test_replacing_a_folder_swaps_it_whole(tmp_path):
    target = tmp_path / "out"
    for content in ("one", "two"):
        with atomic_dir(target) as tmp:
            (tmp / "f").write_text(content)
    assert (target / "f").read_text() == "two" and len(list(tmp_path.iterdir())) == 1


def test_atomic_write_text(tmp_path):
    atomic_write_text(tmp_path / "a.json", "{}")
    assert (tmp_path / "a.json").read_text() == "{}"


def test_latest_ignores_temporaries_and_orders_numerically(tmp_path):
    for name in ("checkpoint-9", "checkpoint-10", ".tmp-checkpoint-11-x", "checkpoint-x"):
        (tmp_path / name).mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-9", "checkpoint-10"]
    assert resolve_resume("latest", tmp_path).name == "checkpoint-10"
    with pytest.raises(CheckpointError, match="not found"):
        resolve_resume(str(tmp_path / "checkpoint-99"), tmp_path)


def test_atomic_text_files_get_ordinary_permissions(tmp_path):
    import os

    from gpg_vl.atomic import atomic_write_text

    umask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
    finally:
        os.umask(umask)
    assert (tmp_path / "config.yaml").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600


def test_resume_state_is_memory_mapped_not_read_whole(tmp_path, monkeypatch):
    # bug 10 of issue 24: every rank torch.load-ed the whole trainer state (Adam included) into host memory
    import torch

    from gpg_vl.checkpoint import STATE_FILE, load_trainer_state

    (tmp_path / "config.json").write_text("{}")
    torch.save({"step": 3, "optimizer": {"state": {0: {"exp_avg": torch.ones(1000)}}}}, tmp_path / STATE_FILE)
    seen = {}
    real_load = torch.load

    def recording_load(*args, **kwargs):
        seen.update(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    state = load_trainer_state(tmp_path)
    assert seen.get("mmap") is True and state["step"] == 3  # pages are read from the file when used
