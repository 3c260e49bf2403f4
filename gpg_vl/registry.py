"""Find a task by name: an entry point in the `gpg_vl.tasks` group, `pkg.module:Class`, or `file.py:Class`.

Built-in tasks register through the same entry-point group a third-party package would use, so there is
exactly one lookup path and no hard-coded list.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from importlib.metadata import entry_points
from pathlib import Path

from gpg_vl.task import Task

ENTRY_POINT_GROUP = "gpg_vl.tasks"


def available_tasks() -> dict[str, str]:
    """Registered task names mapped to their `module:Class` targets, sorted by name."""
    eps = entry_points(group=ENTRY_POINT_GROUP)
    return dict(sorted((ep.name, ep.value) for ep in eps))


def _load_from_file(path: str, class_name: str) -> type:
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise FileNotFoundError(f"task file not found: {path} (from task name '{path}:{class_name}')")
    module_name = f"gpg_vl_user_task_{abs(hash(str(file)))}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, file)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return _attr(sys.modules[module_name], class_name, str(file))


def _attr(module, class_name: str, where: str) -> type:
    try:
        return getattr(module, class_name)
    except AttributeError:
        raise AttributeError(f"{where} has no class {class_name!r}") from None


def get_task_class(name: str) -> type[Task]:
    """Resolve a task name to its class (see module docstring for the accepted forms)."""
    if ":" in name:
        target, class_name = name.rsplit(":", 1)
        if target.endswith(".py") or "/" in target or "\\" in target:
            cls = _load_from_file(target, class_name)
        else:
            cls = _attr(importlib.import_module(target), class_name, f"module {target!r}")
    else:
        registered = available_tasks()
        if name not in registered:
            valid = ", ".join(registered) or "(none installed)"
            raise KeyError(
                f"unknown task {name!r}; registered tasks: {valid} "
                "(or name one as 'package.module:Class' or 'path/to/file.py:Class')"
            )
        (ep,) = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name][:1]
        cls = ep.load()
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TypeError(f"task {name!r} resolved to {cls!r}, which is not a subclass of gpg_vl.Task")
    return cls


def get_task(name: str, **options) -> Task:
    """Instantiate a task by name; keyword options go to the task's constructor."""
    return get_task_class(name)(**options)
