"""Recipes (the YAML configs that ship with gpg-vl) and the `gpg-vl train` command line that picks one.

The repo's `configs/` folder is installed as the package `gpg_vl_recipes` (pyproject.toml), so
`gpg-vl train --task cvbench` finds `cvbench.yaml` after a plain `pip install gpg-vl`, and
`configs/cvbench.yaml` stays a path that works from a checkout. `--print-config` shows the resolved config.
"""

from __future__ import annotations

import argparse
import importlib.resources
from pathlib import Path

import yaml

from gpg_vl.config import Config, ConfigError, load_config

RECIPE_PACKAGE = "gpg_vl_recipes"


def recipe_dir() -> Path:
    """The folder holding the recipes: the installed `gpg_vl_recipes`, or `configs/` of a source checkout run
    without `pip install` (same files either way)."""
    try:
        return Path(str(importlib.resources.files(RECIPE_PACKAGE)))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "configs"


def available_recipes() -> dict[str, Path]:
    """Recipe name -> YAML file; the launcher configs in subfolders (accelerate/, deepspeed/) are not recipes."""
    return {p.stem: p for p in sorted(recipe_dir().glob("*.yaml"))}


def recipe_path(name: str) -> Path:
    """The YAML of recipe `name`, or a ConfigError that lists the recipes and how to run a task without one."""
    recipes = available_recipes()
    if name in recipes:
        return recipes[name]
    raise ConfigError(
        f"--task {name}: no recipe named {name!r}; known recipes: {', '.join(recipes) or '(none found)'}. "
        f"To train a task that has no recipe, name it as an override: "
        f"`gpg-vl train task.name={name}` (defaults) or `gpg-vl train --config FILE task.name={name}`"
    )


def config_to_yaml(cfg: Config) -> str:
    """The resolved config as YAML that `--config` reads back to the same Config."""

    def plain(value):  # tuples (e.g. choice lists) as YAML lists, so safe_dump can write them
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return yaml.safe_dump(plain(cfg.to_dict()), sort_keys=False, default_flow_style=False)


# ---- `gpg-vl train` arguments -------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser, verb: str) -> None:
    source = p.add_mutually_exclusive_group()
    source.add_argument("--config", help="YAML config file (e.g. configs/quickstart.yaml)")
    source.add_argument(
        "--task", metavar="RECIPE",
        help="run a recipe shipped with gpg-vl: " + ", ".join(available_recipes()) + " (fails for any other name; "
        "a task without a recipe runs with task.name=NAME)",
    )
    p.add_argument("--resume", nargs="?", const="latest", help="resume from a checkpoint folder (default: latest in output_dir)")
    p.add_argument("--print-config", action="store_true", help="print the fully resolved config as YAML and exit (loads no model or data)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. train.max_steps=2 algorithm.name=grpo")


def config_from_args(args) -> Config:
    """Defaults <- the recipe of --task or the --config file <- overrides; --resume wins over both."""
    overrides = list(args.overrides)
    path = recipe_path(args.task) if args.task else args.config
    if args.resume:
        overrides.append(f"checkpoint.resume={args.resume}")
    return load_config(path, overrides)
