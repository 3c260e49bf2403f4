"""The README's examples run: the task-plugin example loads and scores, and the commands it shows exist."""

import re
from pathlib import Path

from gpg_vl import get_task

README = (Path(__file__).parent.parent / "README.md").read_text()


def plugin_source() -> str:
    blocks = re.findall(r"```python\n(# my_tasks/dots\.py\n.*?)```", README, re.DOTALL)
    assert len(blocks) == 1, "the README must hold exactly one my_tasks/dots.py example"
    return blocks[0]


def test_plugin_example_loads_scores_and_measures(tmp_path):
    path = tmp_path / "my_tasks" / "dots.py"
    path.parent.mkdir()
    path.write_text(plugin_source())
    task = get_task(f"{path}:DotsTask", max_dots=4)
    examples = task.load("synthetic:6", split="test")
    assert len(examples) == 6 and all(1 <= e["count"] <= 4 for e in examples)
    example = examples[0]
    assert task.messages(example)[0]["content"][0]["image"] is example["image"]
    right = f"<think>counting</think><answer>{example['count']}</answer>"
    assert task.score(right, example).components == {"format": 1.0, "accuracy": 1.0}
    assert task.score("<answer>99</answer>", example).total == 0.0
    assert task.metrics(examples[:2], [right, ""]) == {"accuracy": 0.5}  # one right, one empty


def test_readme_commands_are_real():
    assert "make quickstart" in README and "make test" in README
    assert "make test" in (Path(__file__).parent.parent / ".ci" / "run").read_text()
    for config in re.findall(r"configs/[a-z0-9_/]+\.yaml", README):
        assert (Path(__file__).parent.parent / config).is_file(), config
