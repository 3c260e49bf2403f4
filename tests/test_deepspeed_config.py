"""The DeepSpeed configs in configs/deepspeed/ resolve, without a GPU, to what the trainer needs: our
micro-batch size, DeepSpeed's own accumulation at 1 (the trainer declares each GPG step's boundary), the
stage the file names, bf16, and our gradient clipping. The plugin is built exactly as `accelerate launch`
builds it (its launch-argument parser, its environment variables, then `DeepSpeedPlugin()`)."""

import os
from pathlib import Path

import pytest

pytest.importorskip("deepspeed", reason="pip install 'gpg-vl[deepspeed]'")
CONFIGS = sorted((Path(__file__).parent.parent / "configs" / "deepspeed").glob("*.yaml"))


def plugin_as_launched(config_file: Path, monkeypatch):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "-m", "gpg_vl.cli", "train"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    # what accelerate's launch_command does before handing over to the DeepSpeed launcher
    fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    _, env = prepare_deepspeed_cmd_env(args)
    for key, value in env.items():
        if key.startswith("ACCELERATE_"):
            monkeypatch.setenv(key, value)
    plugin = DeepSpeedPlugin()
    plugin.set_mixed_precision(os.environ.get("ACCELERATE_MIXED_PRECISION", "no"))
    return plugin, defaults


@pytest.mark.parametrize("config_file", CONFIGS, ids=lambda p: p.stem)
def test_deepspeed_config_resolves_to_one_step_per_gpg_step(config_file, monkeypatch):
    from gpg_vl.distributed import configure_deepspeed

    plugin, launcher = plugin_as_launched(config_file, monkeypatch)
    ds = configure_deepspeed(plugin, micro_batch_size=8, world_size=launcher.num_processes, max_grad_norm=1.0)
    assert ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 1
    assert ds["train_batch_size"] == 8 * launcher.num_processes == 64
    assert ds["gradient_clipping"] == 1.0
    assert ds["zero_optimization"]["stage"] == launcher.deepspeed_config["zero_stage"]
    assert ds["bf16"]["enabled"] is True
    assert "auto" not in {ds[k] for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")}
    if ds["zero_optimization"]["stage"] == 3:
        assert plugin.zero3_init_flag and ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_clipping_off_is_zero_for_deepspeed(monkeypatch):
    from gpg_vl.distributed import configure_deepspeed

    plugin, _ = plugin_as_launched(CONFIGS[0], monkeypatch)
    assert configure_deepspeed(plugin, 4, 2, max_grad_norm=0.0)["gradient_clipping"] == 0.0
