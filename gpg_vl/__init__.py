"""gpg-vl: Group Policy Gradient reinforcement learning for vision-language models.

Public surface: `get_task`, `Task`, `RewardOutput`, and the `algorithms` module.
"""

from gpg_vl.registry import available_tasks, get_task
from gpg_vl.task import RewardOutput, Task

__version__ = "0.1.0"
__all__ = ["RewardOutput", "Task", "algorithms", "available_tasks", "get_task", "__version__"]


def __getattr__(name: str):
    # `from gpg_vl import algorithms` works without importing torch for users who only need tasks.
    if name == "algorithms":
        import importlib

        return importlib.import_module("gpg_vl.algorithms")
    raise AttributeError(name)
