"""Fail in a second, not after minutes of retries, when a hub repo is neither reachable nor cached.

Used before loading a model or dataset by hub id. When the hub cannot be reached but the repo is in
the local Hugging Face cache, loading goes on from the cache alone.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def is_hub_id(name: str) -> bool:
    """`owner/name` that is not an existing local path."""
    return bool(_REPO_ID.match(name)) and not Path(name).expanduser().exists()


def offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"))


def is_cached(repo_id: str, repo_type: str = "model") -> bool:
    from huggingface_hub import try_to_load_from_cache

    probe = "config.json" if repo_type == "model" else "README.md"
    found = try_to_load_from_cache(repo_id, probe, repo_type=repo_type)
    return isinstance(found, str)


def reachable(repo_id: str, repo_type: str = "model", timeout: float = 10.0) -> bool:
    """True when the hub answers for this repo (a missing or gated repo raises, with the hub's reason)."""
    if offline():
        return False
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    info = huggingface_hub.model_info if repo_type == "model" else huggingface_hub.dataset_info
    try:
        info(repo_id, timeout=timeout)
        return True
    except HfHubHTTPError:
        raise
    except Exception:  # no route, DNS failure, proxy refusal, timeout
        return False
