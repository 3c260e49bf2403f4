"""Shared fixtures and helpers: an isolated cache for built-in models, a tiny random Qwen2-VL folder per
session, the arguments of a two-step training run on it (`args_for`) and what such a run leaves (`rows`,
`weights`), and `free_port` for tests that start servers or process groups (never a fixed port)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

torch.set_num_threads(min(2, os.cpu_count() or 1))

SCRIPTED_TASK = f"{Path(__file__).parent / 'scripted_task.py'}:ScriptedTask"


def args_for(model_dir, out, *extra) -> list[str]:
    """`gpg-vl train` arguments for two quick steps of the scripted task on `model_dir`, writing to `out`."""
    return [
        "train", f"task.name={SCRIPTED_TASK}",
        f"model.name_or_path={model_dir}", "model.min_pixels=3136", "model.max_pixels=3136",
        "task.train_data=synthetic:64", "task.options={image_size: 56}",
        "rollout.group_size=4", "rollout.max_new_tokens=6", "train.prompts_per_step=4",
        "optim.lr=1e-2", "optim.micro_batch_size=16", "train.max_steps=2",
        f"train.output_dir={out}", "eval.at_end=false", "logging.progress_bar=false",
        "logging.tensorboard=false", "logging.sample_every=1", "checkpoint.save_every=0", *extra,
    ]  # fmt: skip


def weights(folder) -> dict[str, torch.Tensor]:
    """A saved model folder's weights by name."""
    return load_file(str(Path(folder) / "model.safetensors"))


def rows(out) -> list[dict]:
    """A run folder's metrics.jsonl, one dict per logged step."""
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def free_port() -> int:
    """A TCP port free on localhost right now (the OS picks it), so parallel test runs never collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session", autouse=True)
def gpg_cache(tmp_path_factory):
    """Built-in presets are built into a per-session folder, never the user's ~/.cache."""
    folder = tmp_path_factory.mktemp("gpg-vl-cache")
    old = os.environ.get("GPG_VL_CACHE")
    os.environ["GPG_VL_CACHE"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("GPG_VL_CACHE", None)
    else:
        os.environ["GPG_VL_CACHE"] = old


@contextlib.contextmanager
def algorithms_restored():
    """Whatever is registered in gpg_vl.algorithms inside the block is gone after it: every registry table of
    the module (each module-level dict, however the tables are laid out) is put back as it was."""
    from gpg_vl import algorithms

    saved = {name: dict(t) for name, t in vars(algorithms).items() if isinstance(t, dict) and not name.startswith("__")}
    try:
        yield
    finally:
        for name, table in saved.items():
            getattr(algorithms, name).clear()
            getattr(algorithms, name).update(table)


@pytest.fixture
def restore_algorithms():
    """A test that registers algorithms leaves none behind (`algorithms_restored` around the whole test)."""
    with algorithms_restored():
        yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random-weight Qwen2-VL saved as an ordinary Hugging Face folder."""
    from gpg_vl.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("models") / "tiny", seed=0)


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
