"""W&B on --resume, offline (WANDB_MODE=offline): the resumed run reopens the same W&B run and logs the steps
after the checkpoint. What was logged is read back from W&B's own offline run files (`run-<id>.wandb`: a
leveldb-style record log of `Record` protos), not from our logger."""

import json
import shutil
import struct

import pytest

from conftest import args_for
from gpg_vl.cli import main

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402


def wandb_records(path):
    """The `Record`s of one offline run file: a 7-byte header (`:W&B`, magic, version), then 32 KiB blocks of
    chunks, each with a header of crc32 (4 bytes), length (2) and type (1: whole, 2: first, 3: middle, 4: last)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, record = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # a block's zero-filled tail
            pos += left
            continue
        record += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            parsed = wandb_internal_pb2.Record()
            parsed.ParseFromString(record)
            record = b""
            yield parsed


def logged(out):
    """[(run id, resume flag, {step: loss})] per offline run folder, oldest first."""
    runs = []
    for folder in sorted((out / "wandb").glob("offline-run-*")):
        run_id, resume, losses = None, None, {}
        for record in wandb_records(next(folder.glob("run-*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id, resume = record.run.run_id, record.run.resume
            elif kind == "history":
                items = {"/".join(item.nested_key) or item.key: item.value_json for item in record.history.item}
                losses[record.history.step.num] = float(items["loss"])
        runs.append((run_id, resume, losses))
    return runs


@pytest.mark.slow
def test_resume_reopens_the_same_wandb_run_and_logs_from_the_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    common = ["checkpoint.save_every=2", "logging.wandb=true", "logging.sample_every=0"]
    assert main(args_for(tiny_model_dir, out, "train.max_steps=3", *common)) == 0
    # what a crash during step 4 leaves: steps 1-3 logged everywhere, checkpoint-2 the newest on disk
    shutil.rmtree(out / "checkpoint-3")
    assert main(args_for(tiny_model_dir, out, "train.max_steps=4", *common, "--resume")) == 0

    wandb.teardown()  # waits for W&B's service to write everything (a process's exit does it otherwise)
    (first_id, first_resume, first), (second_id, second_resume, second) = logged(out)
    assert first_id == second_id and (first_resume, second_resume) == (False, True)
    assert sorted(first) == [1, 2, 3] and sorted(second) == [3, 4]  # the resumed run logs from step 3 again
    assert (out / "wandb" / "gpg-vl-run-id").read_text().strip() == first_id
    metrics = {row["step"]: row["loss"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert sorted(metrics) == [1, 2, 3, 4] and metrics[3] == second[3] and metrics[4] == second[4]
    assert second[3] == first[3]  # resume is exact: both runs logged the same step 3
