"""Find a task by name: an entry point in the `gpg_vl.tasks` group, `pkg.module:Class`, or `file.py:Class`;
and make a user's algorithms known: `algorithm.plugin` (a file.py or module) or the `gpg_vl.algorithms` group.

Built-in tasks register through the same entry-point group a third-party package would use, so there is
exactly one lookup path and no hard-coded list. Algorithms register by decorator (gpg_vl.algorithms) when
their module is imported; this module only decides which module to import.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from importlib.metadata import entry_points
from pathlib import Path

from gpg_vl.task import Task

ENTRY_POINT_GROUP = "gpg_vl.tasks"
ALGORITHM_ENTRY_POINT_GROUP = "gpg_vl.algorithms"


def available_tasks() -> dict[str, str]:
    """Registered task names mapped to their `module:Class` targets, sorted by name."""
    eps = entry_points(group=ENTRY_POINT_GROUP)
    return dict(sorted((ep.name, ep.value) for ep in eps))


def _load_from_file(path: str, class_name: str) -> type:
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise FileNotFoundError(f"task file not found: {path} (from task name '{path}:{class_name}')")
    return _attr(_import_file(file), class_name, str(file))


def _import_file(file: Path):
    """Import a .py file once per process (a second import would register its algorithms twice)."""
    module_name = f"gpg_vl_user_task_{abs(hash(str(file)))}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, file)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]  # a fixed file can be imported again
            raise
    return sys.modules[module_name]


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


def task_option_names(cls: type[Task]) -> set[str]:
    """Keyword options `cls(**options)` accepts, read from the __init__ signatures without building it.

    A constructor that takes **options passes them on to the next class in the MRO (the convention every
    task here follows), so its base's names count too; `Task.__init__` itself accepts none."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is Task or klass is object or "__init__" not in vars(klass):
            continue
        params = inspect.signature(vars(klass)["__init__"]).parameters.values()
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


def import_plugin(target: str):
    """Import a user's module by file (`path/to/file.py`) or dotted name (`pkg.module`), once per process;
    the algorithms (or anything else) it registers on import are then known."""
    if target.endswith(".py") or "/" in target or "\\" in target:
        file = Path(target).expanduser().resolve()
        if not file.is_file():
            raise FileNotFoundError(f"plugin file not found: {target}")
        return _import_file(file)
    return importlib.import_module(target)


def available_algorithms() -> list[str]:
    """Algorithms registered in gpg_vl.algorithms plus those an installed package offers by entry point."""
    from gpg_vl import algorithms

    offered = {ep.name for ep in entry_points(group=ALGORITHM_ENTRY_POINT_GROUP)}
    return sorted(set(algorithms.registered_algorithms()) | offered)


def load_algorithm(name: str) -> None:
    """Import the `gpg_vl.algorithms` entry point called `name` unless `name` is registered already."""
    from gpg_vl import algorithms

    if name in algorithms.registered_algorithms():
        return
    for ep in entry_points(group=ALGORITHM_ENTRY_POINT_GROUP):
        if ep.name == name:
            ep.load()
            return
