"""Build a built-in preset (`builtin:<name>`) into its cache folder, once: the explicit step before loading.

`build_builtin` makes the tiny model (`gpg_vl.tiny`) and, for a `-warm` preset, runs its format warm-up
(`gpg_vl.warmup`) on top; a folder that is complete and built with the same warm-up is reused. The entry
points call it (`gpg-vl make-tiny --builtin`, `train`, `eval`, `demo`); `builtin.resolve_model_path` only looks.
"""

from __future__ import annotations

from gpg_vl.atomic import atomic_write_text
from gpg_vl.builtin import BUILTIN_PREFIX, BUILTINS, WARM_RECORD, is_built, preset_folder, warm_record


def build_builtin(name_or_path: str) -> str:
    """The folder of `builtin:<preset>`, built first if needed; any other name or path is returned unchanged."""
    if not name_or_path.startswith(BUILTIN_PREFIX):
        return name_or_path
    preset = name_or_path[len(BUILTIN_PREFIX) :]
    folder = preset_folder(preset)  # an unknown preset fails here, naming the known ones
    if is_built(preset):
        return str(folder)
    arch, size, warm = BUILTINS[preset]
    if warm is None:
        from gpg_vl import tiny

        tiny.make_tiny(folder, arch=arch, preset=size)
        return str(folder)
    from gpg_vl import warmup

    base = next(k for k, v in BUILTINS.items() if v == (arch, size, None))  # the same size without a warm-up
    warmup.make_format_warm(folder, base=build_builtin(BUILTIN_PREFIX + base), task=warm.task,
                            task_options=warm.options or None, max_new_tokens=warm.max_new_tokens)  # fmt: skip
    atomic_write_text(folder / WARM_RECORD, warm_record(preset))  # last: a build cut short is built again next time
    return str(folder)
