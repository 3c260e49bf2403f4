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


# ---------------------------------------------------------------- a user's algorithm

RLOO = '''
from gpg_vl import algorithms

@algorithms.register_advantage("my_rloo", std_normalize=False, options=())
def rloo_advantages(rewards, *, group_size, std_normalize=False, eps=1e-6, atol=1e-6):
    """RLOO: r_i minus the mean of the group's OTHER rewards = G / (G - 1) * (r_i - group mean)."""
    grouped = rewards.view(-1, group_size)
    return ((grouped - grouped.mean(-1, keepdim=True)) * group_size / (group_size - 1)).flatten()

@algorithms.register_policy_loss("my_rloo", loss_agg="seq_mean", options=())
def rloo_loss(logprobs, advantages, mask, **_):
    return -advantages * logprobs, {"rloo_used": 1.0}
'''


def test_a_fourth_algorithm_from_a_plugin_file_trains_through_the_cli(tmp_path, restore_algorithms):
    import json
    import math
    import sys
    from pathlib import Path

    plugin = tmp_path / "my_algos.py"
    plugin.write_text(RLOO)
    out = tmp_path / "run"
    task = f"{Path(__file__).parent / 'scripted_task.py'}:ScriptedTask"
    modules = set(sys.modules)
    try:
        code = main([
            "train", f"task.name={task}", "model.name_or_path=builtin:tiny", "model.min_pixels=3136", "model.max_pixels=3136",
            f"algorithm.plugin={plugin}", "algorithm.name=my_rloo", "task.train_data=synthetic:32",
            "task.options={image_size: 56}", "rollout.group_size=4", "rollout.max_new_tokens=6",
            "train.prompts_per_step=4", "optim.lr=1e-2", "train.max_steps=2", f"train.output_dir={out}",
            "eval.at_end=false", "logging.progress_bar=false", "logging.tensorboard=false", "checkpoint.save_every=0",
        ])
        assert code == 0
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2]
        assert all(math.isfinite(r["loss"]) for r in rows)
        assert any(r["skipped"] == 0 and r.get("loss/rloo_used") == 1.0 for r in rows)  # the plugin's loss ran
        saved = json.loads(json.dumps(__import__("yaml").safe_load((out / "config.yaml").read_text())))
        assert saved["algorithm"]["name"] == "my_rloo" and saved["algorithm"]["loss_agg"] == "seq_mean"  # its default
    finally:
        for name in set(sys.modules) - modules:
            if name.startswith("gpg_vl_user_task_"):
                del sys.modules[name]


def test_an_algorithm_offered_by_entry_point_is_loaded_when_named(tmp_path, monkeypatch, restore_algorithms):
    from importlib.metadata import EntryPoint

    from gpg_vl import algorithms, registry
    from gpg_vl.config import load_config

    (tmp_path / "ep_algos.py").write_text(RLOO.replace('"my_rloo"', '"ep_rloo"'))
    monkeypatch.syspath_prepend(str(tmp_path))
    real = registry.entry_points
    offered = [EntryPoint(name="ep_rloo", value="ep_algos", group=registry.ALGORITHM_ENTRY_POINT_GROUP)]
    monkeypatch.setattr(registry, "entry_points",
                        lambda group: offered if group == registry.ALGORITHM_ENTRY_POINT_GROUP else real(group=group))
    try:
        assert "ep_rloo" in registry.available_algorithms() and "ep_rloo" not in algorithms.registered_algorithms()
        cfg = load_config(None, ["algorithm.name=ep_rloo"])  # importing the entry point registered it
        assert cfg.algorithm.loss_agg == "seq_mean" and "ep_rloo" in algorithms.registered_algorithms()
    finally:
        monkeypatch.delitem(__import__("sys").modules, "ep_algos", raising=False)


def test_algorithms_registered_in_a_test_are_forgotten_after_it(tmp_path):
    """Invariant: `algorithms_restored` (behind the `restore_algorithms` fixture of the two tests above) removes
    an algorithm registered inside it from every table, and keeps the built-in ones."""
    import sys

    from conftest import algorithms_restored
    from gpg_vl import algorithms, registry

    before, modules = algorithms.registered_algorithms(), set(sys.modules)
    (tmp_path / "rloo_algos.py").write_text(RLOO.replace('"my_rloo"', '"tmp_rloo"'))
    with algorithms_restored():
        registry.import_plugin(str(tmp_path / "rloo_algos.py"))
        assert "tmp_rloo" in algorithms.registered_algorithms()
    for name in set(sys.modules) - modules:  # the plugin file's module, imported once per process
        del sys.modules[name]
    assert algorithms.registered_algorithms() == before and "gpg" in before
    assert not any("tmp_rloo" in t for t in vars(algorithms).values() if isinstance(t, dict))
