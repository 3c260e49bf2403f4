"""The task registry: entry points, module:Class, file.py:Class, and helpful errors."""

import pytest

from gpg_vl import Task, available_tasks, get_task
from gpg_vl.cli import main

PLUGIN = '''
from gpg_vl import RewardOutput, Task

class Echo(Task):
    name = "echo"
    description = "test plugin"

    def __init__(self, word="yes"):
        super().__init__()
        self.word = word

    def score(self, completion, example):
        return RewardOutput(float(self.word in completion), {"hit": float(self.word in completion)})
'''


def test_builtin_tasks_register_through_entry_points():
    names = available_tasks()
    assert {"shapes", "cvbench", "geometry", "lisa", "refcoco", "classification"} <= set(names)
    assert names["shapes"] == "gpg_vl_tasks.shapes:ShapesTask"
    assert isinstance(get_task("shapes"), Task)


def test_task_from_file_with_options(tmp_path):
    plugin = tmp_path / "my_task.py"
    plugin.write_text(PLUGIN)
    task = get_task(f"{plugin}:Echo", word="ok")
    assert task.score("it is ok", {}).total == 1.0
    assert task.score("nope", {}).components == {"hit": 0.0}


def test_task_from_module_path():
    task = get_task("gpg_vl_tasks.shapes:ShapesTask", image_size=64)
    assert task.image_size == 64


def test_unknown_name_lists_valid_ones():
    with pytest.raises(KeyError, match="registered tasks: .*shapes"):
        get_task("nope")


def test_bad_targets_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.py"):
        get_task(f"{tmp_path}/missing.py:X")
    with pytest.raises(AttributeError, match="no class 'Nope'"):
        get_task("gpg_vl_tasks.shapes:Nope")
    with pytest.raises(TypeError, match="not a subclass"):
        get_task("gpg_vl.config:Config")
    with pytest.raises(TypeError, match="colour"):
        get_task("shapes", colour="red")


def test_cli_lists_tasks_with_descriptions(capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert "shapes" in out and "Synthetic" in out
    assert "failed to load" not in out
