"""The offline twins as learning benchmarks: reference answers, the per-task format warm-up, the twin configs.

benchmarks/compare_algorithms.py trains every family's twin from benchmarks/twins/*.yaml on a tiny model warmed
up with `Task.reference_answer`; these tests pin what that rests on.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from gpg_vl.builtin import BUILTINS
from gpg_vl.config import load_config
from gpg_vl.images import ImageBudget
from gpg_vl.registry import get_task

ROOT = Path(__file__).resolve().parents[1]
TWIN_TASKS = ["shapes", "cvbench", "classification", "geometry", "lisa", "refcoco"]


def compare_module():
    spec = importlib.util.spec_from_file_location("compare_algorithms", ROOT / "benchmarks" / "compare_algorithms.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["compare_algorithms"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", TWIN_TASKS)
def test_the_reference_answer_earns_the_full_reward(name):
    """Written in <answer>, an example's reference answer is right by the task's own reward (IoU > 0.9 for boxes),
    and another example's reference is a well-formed answer: what the format warm-up teaches."""
    task = get_task(name)
    task.configure_images(ImageBudget(3136, 12544, 28))
    examples = task.load("synthetic:12", split="test")
    for example in examples:
        completion = f"<think>look</think><answer>{task.reference_answer(example)}</answer>"
        reward = task.score(completion, example)
        assert reward.components["format"] == 1.0
        if "iou" in reward.components:
            assert reward.components["iou"] > 0.9, (example["id"], completion, example["box"])
        else:
            assert reward.components["accuracy"] == 1.0, (example["id"], completion)
    wrong = [task.score(f"<answer>{task.reference_answer(examples[0])}</answer>", e) for e in examples[1:]]
    assert not all(r.components.get("accuracy", r.components.get("iou", 0)) >= 1.0 for r in wrong)


def test_a_task_without_reference_answers_cannot_be_warmed(tiny_model_dir, tmp_path):
    from gpg_vl.warmup import make_format_warm

    with pytest.raises(ValueError, match="no reference_answer"):
        make_format_warm(tmp_path / "warm", base=str(tiny_model_dir), task="generic", task_options={}, max_steps=1)


def test_warm_up_on_another_task_saves_a_loadable_model(tiny_model_dir, tmp_path):
    from transformers import AutoModelForImageTextToText

    from gpg_vl.warmup import make_format_warm

    out = make_format_warm(tmp_path / "warm", base=str(tiny_model_dir), task="classification", max_steps=2, check_every=1)
    assert AutoModelForImageTextToText.from_pretrained(out) is not None


def test_every_twin_config_is_valid_and_its_warm_model_is_a_builtin():
    compare = compare_module()
    assert sorted(compare.TASKS) == ["classification", "cvbench", "geometry", "lisa", "shapes"]
    for name, twin in compare.TASKS.items():
        cfg = load_config(ROOT / twin.config, [])
        assert cfg.task.train_data.startswith("synthetic") and cfg.task.eval_data.startswith("synthetic"), name
        assert cfg.model.name_or_path.removeprefix("builtin:") in BUILTINS, name
        task = get_task(cfg.task.name, **cfg.task.options)
        assert twin.metric in task.metrics(*_one_scored(task)), (name, twin.metric)


def _one_scored(task):
    examples = task.load("synthetic:2", split="test")
    return examples, ["<think>x</think><answer>(A)</answer>"] * len(examples)


def test_compare_refuses_a_sweep_on_a_table_seed(capsys):
    compare = compare_module()
    sys_argv = sys.argv
    sys.argv = ["compare_algorithms.py", "--task", "shapes", "--seeds", "0", "1", "--sweep", "1e-3", "--sweep-seed", "1"]
    try:
        with pytest.raises(SystemExit):
            compare.main()
    finally:
        sys.argv = sys_argv
    assert "separate seed" in capsys.readouterr().err


def test_compare_reads_finished_runs_into_a_table_without_rerunning(tmp_path, monkeypatch):
    """Finished run folders are read, not rerun; the table names each algorithm's rate, finals and diagnostics."""
    compare = compare_module()
    monkeypatch.setattr(compare.subprocess, "run", lambda *a, **k: pytest.fail("a finished run was rerun"))
    finals = {"gpg": [0.9, 1.0], "dr_grpo": [0.5, 0.75]}
    for algo, values in finals.items():
        for seed, value in zip((0, 1), values):
            folder = compare.Run(algo, seed, 6e-4).folder(tmp_path)
            folder.mkdir(parents=True)
            lines = [{"step": 0, "eval/accuracy": 0.25}]
            lines += [{"step": s, "reward/accuracy": 0.5, "valid_fraction": 0.5, "alpha": 2.0, "resample_attempts": 1,
                       "skipped": 0, "step_time_s": 0.1} for s in (1, 2)]
            lines[-1]["eval/accuracy"] = value
            (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    monkeypatch.setattr(sys, "argv", ["compare_algorithms.py", "--task", "shapes", "--seeds", "0", "1", "--steps", "2",
                                      "--algorithms", "gpg", "dr_grpo", "--out", str(tmp_path), "--target", "0.9"])
    assert compare.main() == 0
    table = (tmp_path / "results.md").read_text()
    assert "| gpg | 0.0006 | 0.950 | 0.071 | 0.900 | 1.000 | 0.900, 1.000 | 0.500 | 0.50 | 2.00 | 1.00 | 0 | 0.10 | - | 2 of 2 |" in table
    assert "| dr_grpo | 0.0006 | 0.625 |" in table and "| 0 of 2 |" in table
    assert "Before training (step 0): 0.250." in table
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_each_twin_is_warmed_up_on_its_own_task_and_options():
    """A twin's warm model must have learned the answer form of the data it trains on (same task, same options)."""
    compare = compare_module()
    for name, twin in compare.TASKS.items():
        cfg = load_config(ROOT / twin.config, [])
        warm = BUILTINS[cfg.model.name_or_path.removeprefix("builtin:")][2]
        assert warm is not None and warm.task == cfg.task.name, name
        if name != "shapes":  # the quickstart's warm-up asks both shapes questions on purpose
            assert warm.options == dict(cfg.task.options), (name, warm.options, cfg.task.options)


@pytest.mark.parametrize("name, steps", [("shapes", 500), ("lisa", 200)])
def test_compare_runs_each_twin_for_its_configs_max_steps_by_default(name, steps, tmp_path, monkeypatch):
    """Without --steps, a run lasts the twin config's train.max_steps, so one loop over the tasks runs each at its length."""
    compare = compare_module()
    seen = []

    def fake_run_one(run, task, n_steps, out, extra, threads):
        seen.append(n_steps)
        raise SystemExit(0)  # stop before reading results: only the length is under test

    monkeypatch.setattr(compare, "run_one", fake_run_one)
    monkeypatch.setattr(sys, "argv", ["compare_algorithms.py", "--task", name, "--seeds", "0", "--algorithms", "gpg", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        compare.main()
    assert seen == [steps]


def test_compare_lr_fixes_a_rate_and_skips_that_algorithms_sweep(tmp_path, monkeypatch):
    """--lr grpo=R: GRPO runs its seeds at R without sweep runs; the others still sweep; the table says so."""
    compare = compare_module()
    ran = []

    def fake_run_one(run, task, steps, out, extra, threads):
        ran.append(run)
        folder = run.folder(out)
        folder.mkdir(parents=True, exist_ok=True)
        value = 0.5 if run.lr == 1.2e-3 else 0.25
        (folder / "metrics.jsonl").write_text(json.dumps({"step": 1, "eval/accuracy": value, "reward/accuracy": 0.5,
                                                          "valid_fraction": 1.0, "step_time_s": 0.1}) + "\n")
        return folder

    monkeypatch.setattr(compare, "run_one", fake_run_one)
    monkeypatch.setattr(compare, "plot", lambda *a, **k: None)
    monkeypatch.setattr(sys, "argv", ["compare_algorithms.py", "--task", "shapes", "--seeds", "0", "--steps", "1", "--algorithms",
                                      "gpg", "grpo", "--sweep", "6e-4", "1.2e-3", "--lr", "grpo=3e-4", "--out", str(tmp_path)])
    assert compare.main() == 0
    assert {(r.algo, r.seed, r.lr) for r in ran} == {("gpg", 100, 6e-4), ("gpg", 100, 1.2e-3), ("gpg", 0, 1.2e-3), ("grpo", 0, 3e-4)}
    table = (tmp_path / "results.md").read_text()
    assert "| grpo | 0.0003 |" in table and "Rates fixed with --lr, not swept: grpo 0.0003." in table
    monkeypatch.setattr(sys, "argv", ["compare_algorithms.py", "--task", "shapes", "--lr", "ppo=1e-3"])
    with pytest.raises(SystemExit):
        compare.main()


def test_compare_overrides_come_after_each_algorithms_settings_and_are_named_in_the_table(tmp_path, monkeypatch):
    """An ablation (GRPO without its KL term) is one command: the trailing override wins over grpo's kl_coef=0.04."""
    compare = compare_module()
    commands = []

    def fake_subprocess_run(cmd, **kwargs):
        commands.append(cmd)
        folder = Path(next(c for c in cmd if c.startswith("train.output_dir=")).split("=", 1)[1])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.jsonl").write_text(json.dumps({"step": 2, "eval/accuracy": 0.5, "reward/accuracy": 0.5,
                                                          "valid_fraction": 1.0, "step_time_s": 0.1}) + "\n")

    monkeypatch.setattr(compare.subprocess, "run", fake_subprocess_run)
    monkeypatch.setattr(sys, "argv", ["compare_algorithms.py", "--task", "shapes", "--seeds", "0", "--steps", "2",
                                      "--algorithms", "grpo", "--out", str(tmp_path), "algorithm.kl_coef=0"])
    assert compare.main() == 0
    (cmd,) = commands
    assert cmd.index("algorithm.kl_coef=0.04") < cmd.index("algorithm.kl_coef=0")
    assert load_config(ROOT / compare.TASKS["shapes"].config, cmd[cmd.index("train") + 3:]).algorithm.kl_coef == 0.0
    assert "every run with `algorithm.kl_coef=0`" in (tmp_path / "results.md").read_text().splitlines()[0]
