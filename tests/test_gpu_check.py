"""benchmarks/gpu_check.py, the check for the day a GPU is lent, in its CPU-safe parts: --help and
--dry-run work without CUDA, every mode's `gpg-vl train` command is a valid config (checked with
--print-config, which loads nothing), and without CUDA a real run refuses in one line instead of pretending."""

import importlib.util
from pathlib import Path

import pytest

from gpg_vl.cli import main as cli_main

PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help_and_dry_run_list_the_tests_and_every_mode(capsys):
    check = gpu_check()
    with pytest.raises(SystemExit) as e:
        check.main(["--help"])
    assert e.value.code == 0
    capsys.readouterr()
    assert check.main(["--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "-m gpu" in lines[0] and len(lines) == 1 + len(check.MODES)
    assert all("builtin:2b-shape" in line for line in lines[1:])


@pytest.mark.parametrize("mode", list(gpu_check().MODES))
def test_every_mode_is_a_valid_train_config(mode, tmp_path, capsys):
    check = gpu_check()
    argv = check.train_command(mode, tmp_path / "run")[3:]  # drop "python -m gpg_vl.cli"
    assert cli_main([*argv, "--print-config"]) == 0, capsys.readouterr().err
    assert "2b-shape" in capsys.readouterr().out


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_without_cuda_a_real_run_refuses(capsys):
    assert gpu_check().main(["--skip-tests"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
