"""Shared fixtures: an isolated cache for built-in models and a tiny random Qwen2-VL folder per session."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


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
