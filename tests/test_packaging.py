"""Recipes ship with the package and `--task`/`--print-config` behave as documented, in-process and from a built
wheel installed outside the source tree (so nothing can come from the checkout)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from gpg_vl.cli import main
from gpg_vl.config import load_config
from gpg_vl.recipes import available_recipes, recipe_dir

ROOT = Path(__file__).resolve().parent.parent
REPO_RECIPES = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
REPO_LAUNCHERS = sorted(str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").glob("*/*.yaml"))


def test_every_yaml_in_configs_is_a_recipe_and_the_launchers_are_not():
    assert sorted(f"{name}.yaml" for name in available_recipes()) == REPO_RECIPES
    assert {"quickstart", "cvbench", "geometry", "lisa", "refcoco", "classification"} <= set(available_recipes())
    assert (recipe_dir() / "accelerate" / "ddp_gpu.yaml").is_file()  # shipped beside them, not listed as recipes


def test_task_loads_its_recipe_and_print_config_round_trips(tmp_path, capsys, monkeypatch):
    import gpg_vl.trainer as trainer

    monkeypatch.setattr(trainer, "train", lambda cfg: pytest.fail("--print-config must not train"))
    # a model that does not exist: --print-config loads no model (or data), so it still succeeds
    assert main(["train", "--task", "cvbench", "--print-config", "model.name_or_path=/no/such/model", "train.max_steps=7"]) == 0
    printed = capsys.readouterr().out
    data = yaml.safe_load(printed)
    assert data["model"]["name_or_path"] == "/no/such/model" and data["train"]["max_steps"] == 7  # overrides win
    assert data["task"]["name"] == "cvbench" and data["model"]["attn_implementation"] == "flash_attention_2"  # the recipe
    (tmp_path / "resolved.yaml").write_text(printed)
    recipe = load_config(available_recipes()["cvbench"], ["model.name_or_path=/no/such/model", "train.max_steps=7"])
    assert load_config(tmp_path / "resolved.yaml") == recipe  # what is printed is the config that would run


@pytest.mark.parametrize("name", sorted(available_recipes()))
def test_every_recipe_prints_as_yaml_that_loads_back_unchanged(name, tmp_path):
    from gpg_vl.recipes import config_to_yaml

    cfg = load_config(available_recipes()[name])
    (tmp_path / "resolved.yaml").write_text(config_to_yaml(cfg))
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_print_config_without_recipe_is_the_defaults(capsys):
    assert main(["train", "--print-config", "task.name=shapes"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == yaml.safe_load(yaml.safe_dump(load_config(None, ["task.name=shapes"]).to_dict()))


def test_unknown_recipe_fails_listing_recipes_and_the_way_without_one(capsys):
    assert main(["train", "--task", "shapes", "--print-config"]) == 2  # a registered task, but no recipe
    err = capsys.readouterr().err
    assert "no recipe named 'shapes'" in err
    assert all(name in err for name in available_recipes())
    assert "task.name=shapes" in err and "--config FILE task.name=shapes" in err


def test_config_and_task_are_one_or_the_other(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--task", "cvbench"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


@pytest.mark.slow
def test_wheel_ships_the_recipes_and_runs_them_outside_the_source_tree(tmp_path):
    pytest.importorskip("setuptools", reason="the wheel is built without build isolation, from this env's setuptools")
    # Build from a copy, so no build/ or *.egg-info lands in the shared working tree.
    src = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for folder in ("gpg_vl", "tasks", "demo", "configs"):
        shutil.copytree(ROOT / folder, src / folder, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("gpg_vl-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert sorted(n.split("/", 1)[1] for n in names if n.startswith("gpg_vl_recipes/") and n.endswith(".yaml") and n.count("/") == 1) == REPO_RECIPES
    assert all(f"gpg_vl_recipes/{p}" in names for p in REPO_LAUNCHERS)

    target = tmp_path / "site"
    installed = subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-2000:]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}

    def run(*args):
        return subprocess.run([sys.executable, *args], cwd=outside, env=env, capture_output=True, text=True, timeout=600)

    where = run("-c", "import gpg_vl, gpg_vl_recipes; print(gpg_vl.__file__); print(gpg_vl_recipes.__file__)")
    assert where.returncode == 0 and all(line.startswith(str(target)) for line in where.stdout.split()), where.stdout + where.stderr
    shown = run(str(target / "bin" / "gpg-vl"), "train", "--task", "cvbench", "--print-config")  # the wheel's entry point
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "name_or_path: Qwen/Qwen2-VL-2B\n" in shown.stdout and "name: cvbench\n" in shown.stdout
    missing = run(str(target / "bin" / "gpg-vl"), "train", "--task", "nope", "--print-config")
    assert missing.returncode == 2 and "known recipes: " in missing.stderr and "quickstart" in missing.stderr
