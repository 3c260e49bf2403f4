"""Built-in model presets (`builtin:<name>`): built once from the offline kit, then cached and loaded like a folder.

This module sits above the kit (`tiny`, `warmup`) and below model loading (`modeling`), so neither imports
the other back: `modeling.load_policy` asks here for a folder and never builds anything itself.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class WarmUp:
    """A format warm-up (gpg_vl/warmup.py) on `task` with `options`, probing `max_new_tokens`-token samples."""

    task: str
    options: dict = field(default_factory=dict)
    max_new_tokens: int = 24


# name -> (arch, size preset, the format warm-up on top, or None)
BUILTINS = {
    "tiny": ("qwen2_vl", "tiny", None),
    "tiny-warm": ("qwen2_vl", "tiny", WarmUp("shapes")),  # the quickstart's policy
    "tiny-qwen2_5_vl": ("qwen2_5_vl", "tiny", None),
    "tiny-qwen3_vl": ("qwen3_vl", "tiny", None),
    # head size 32, which vLLM's CPU backend accepts (tiny's 24 it refuses): the vLLM tests and quickstart
    "tiny-h32": ("qwen2_vl", "tiny-h32", None),
    "tiny-h32-warm": ("qwen2_vl", "tiny-h32", WarmUp("shapes")),
    "tiny-h32-qwen2_5_vl": ("qwen2_5_vl", "tiny-h32", None),
    "tiny-h32-qwen3_vl": ("qwen3_vl", "tiny-h32", None),
    "small-20m": ("qwen2_vl", "small-20m", None),
    "2b-shape": ("qwen2_vl", "2b-shape", None),
    # one per offline twin (benchmarks/twins/*.yaml), on the answer form and data of that twin
    "tiny-warm-cvbench": ("qwen2_vl", "tiny", WarmUp("cvbench", {"synthetic_tasks": ["Count"], "synthetic_easy": True})),
    "tiny-warm-geometry": ("qwen2_vl", "tiny", WarmUp("geometry", {"synthetic_easy": True})),
    "tiny-warm-lisa": ("qwen2_vl", "tiny", WarmUp("lisa", {"synthetic_easy": True}, max_new_tokens=48)),
    "tiny-warm-classification": ("qwen2_vl", "tiny", WarmUp("classification", {"synthetic_easy": True})),
}
KIT_VERSION = "3"  # bump when the kit or the warm-up data changes, so stale caches are rebuilt (3: new shapes palette)
WARM_RECORD = "warmup.json"  # in a warm preset's folder: the WarmUp it was built with


class ModelLoadError(RuntimeError):
    """A model or processor that cannot be found or read."""


def cache_dir() -> Path:
    """Where built-in presets are built once and reused ($GPG_VL_CACHE, default ~/.cache/gpg-vl)."""
    return Path(os.environ.get("GPG_VL_CACHE", Path.home() / ".cache" / "gpg-vl"))


def resolve_model_path(name_or_path: str) -> str:
    """A loadable folder or hub id; `builtin:<preset>` is built (and cached) on first use."""
    if not name_or_path.startswith(BUILTIN_PREFIX):
        return name_or_path
    preset = name_or_path[len(BUILTIN_PREFIX) :]
    if preset not in BUILTINS:
        raise ModelLoadError(f"unknown built-in model {name_or_path!r}; choose one of {', '.join(BUILTIN_PREFIX + k for k in BUILTINS)}")
    arch, size, warm = BUILTINS[preset]
    folder = cache_dir() / f"{preset}-v{KIT_VERSION}"
    if warm:
        # The folder records the warm-up it was built with; a preset whose task or options changed is rebuilt.
        record, spec = folder / WARM_RECORD, json.dumps(asdict(warm), sort_keys=True)
        if not (folder / "config.json").exists() or not record.exists() or record.read_text() != spec:
            from gpg_vl.checkpoint import atomic_write_text
            from gpg_vl.warmup import make_format_warm

            base = resolve_model_path(BUILTIN_PREFIX + next(k for k, v in BUILTINS.items() if v == (arch, size, None)))
            make_format_warm(folder, base=base, task=warm.task, task_options=warm.options or None, max_new_tokens=warm.max_new_tokens)
            atomic_write_text(record, spec)  # last: a build cut short before this is built again next time
    elif not (folder / "config.json").exists():
        from gpg_vl.tiny import make_tiny

        make_tiny(folder, arch=arch, preset=size)
    return str(folder)
