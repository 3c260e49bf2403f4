"""Built-in model presets (`builtin:<name>`): the table, and where each one's folder lies once it is built.

Pure lookup with no project imports: `resolve_model_path` maps a preset to its cached folder and never builds
it. Building (the tiny kit, then a format warm-up for a `-warm` preset) is an explicit step in `gpg_vl.kit`,
which `gpg-vl make-tiny --builtin NAME`, `gpg-vl train`, `eval` and `demo` call; loading never trains a model.
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
    "tiny-warm": ("qwen2_vl", "tiny", WarmUp("shapes", {"questions": ["color", "shape"]})),  # the quickstart's policy
    "tiny-qwen2_5_vl": ("qwen2_5_vl", "tiny", None),
    "tiny-qwen3_vl": ("qwen3_vl", "tiny", None),
    # head size 32, which vLLM's CPU backend accepts (tiny's 24 it refuses): the vLLM tests and quickstart
    "tiny-h32": ("qwen2_vl", "tiny-h32", None),
    "tiny-h32-warm": ("qwen2_vl", "tiny-h32", WarmUp("shapes", {"questions": ["color", "shape"]})),
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


def preset_folder(preset: str) -> Path:
    """The cache folder of `preset` (built or not); a ModelLoadError names the presets for an unknown one."""
    if preset not in BUILTINS:
        names = ", ".join(BUILTIN_PREFIX + k for k in BUILTINS)
        raise ModelLoadError(f"unknown built-in model {BUILTIN_PREFIX + preset!r}; choose one of {names}")
    return cache_dir() / f"{preset}-v{KIT_VERSION}"


def warm_record(preset: str) -> str | None:
    """The record a built warm preset keeps of its warm-up (None for a preset without one)."""
    warm = BUILTINS[preset][2]
    return json.dumps(asdict(warm), sort_keys=True) if warm else None


def is_built(preset: str) -> bool:
    """The preset's folder is complete, and a warm preset's was built with the warm-up the table names now."""
    folder, record = preset_folder(preset), warm_record(preset)
    if not (folder / "config.json").exists():
        return False
    return record is None or ((folder / WARM_RECORD).exists() and (folder / WARM_RECORD).read_text() == record)


def resolve_model_path(name_or_path: str) -> str:
    """A loadable folder or hub id: `builtin:<preset>` maps to its cached folder, which must be built already."""
    if not name_or_path.startswith(BUILTIN_PREFIX):
        return name_or_path
    preset = name_or_path[len(BUILTIN_PREFIX) :]
    if not is_built(preset):
        raise ModelLoadError(
            f"{name_or_path} is not built yet (or was built with another warm-up) in {cache_dir()}; "
            f"build it with `gpg-vl make-tiny --builtin {preset}` (gpg-vl train, eval and demo build it themselves)"
        )
    return str(preset_folder(preset))
