"""Config: every recipe loads, overrides change fields, and bad keys/types fail naming the key and file."""

from pathlib import Path

import pytest

from gpg_vl.config import Config, ConfigError, field_docs, load_config, parse_override

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_there_are_recipes():
    assert {p.stem for p in CONFIGS} >= {"quickstart"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_recipe_loads_and_says_how_to_run_it(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# gpg-vl ") or first.startswith("# accelerate "), f"{path.name} must open with its command"


def test_override_changes_the_field_and_types_are_parsed():
    cfg = load_config(None, ["algorithm.name=grpo", "optim.lr=1e-3", "train.max_steps=2", "task.options={questions: [shape]}"])
    assert cfg.algorithm.name == "grpo" and cfg.optim.lr == 1e-3 and cfg.train.max_steps == 2
    assert cfg.task.options == {"questions": ["shape"]}
    # derived values are filled in finalize(): grpo defaults to std normalisation and seq_mean
    assert cfg.algorithm.std_normalize is True and cfg.algorithm.loss_agg == "seq_mean"
    assert load_config(None).algorithm.loss_agg == "token_mean"


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*optim\.learning_rate"):
        load_config(bad)


def test_unknown_override_and_wrong_type_fail():
    with pytest.raises(ConfigError, match="train.max_stepz"):
        load_config(None, ["train.max_stepz=3"])
    with pytest.raises(ConfigError, match="train.max_steps.*int"):
        load_config(None, ["train.max_steps=many"])
    with pytest.raises(ConfigError, match="must look like"):
        parse_override("train.max_steps")


def test_section_needs_mapping_and_cross_field_rules(tmp_path):
    bad = tmp_path / "b.yaml"
    bad.write_text("optim: 3\n")
    with pytest.raises(ConfigError, match="'optim' is a section"):
        load_config(bad)
    with pytest.raises(ConfigError, match="algorithm.name"):
        load_config(None, ["algorithm.name=ppo"])
    with pytest.raises(ConfigError, match="kl_coef"):
        load_config(None, ["algorithm.kl_coef=0.1"])  # KL is a GRPO option; GPG has no reference model


def test_every_field_has_a_docstring():
    import dataclasses

    for section in dataclasses.fields(Config):
        cls = type(getattr(Config(), section.name))
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


LAUNCHERS = sorted((Path(__file__).parent.parent / "configs").glob("*/*.yaml"))


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_launcher_configs_parse_and_say_how_to_run_them(path):
    import yaml

    assert isinstance(yaml.safe_load(path.read_text()), dict)
    assert path.read_text().startswith("# accelerate launch --config_file configs/")


def test_a_user_algorithm_is_valid_with_its_registered_defaults_and_options():
    from gpg_vl import algorithms

    try:
        @algorithms.register_advantage("mine", std_normalize=True, options=())
        def mine_advantages(rewards, *, group_size, std_normalize=True, eps=1e-6, atol=1e-6):
            return rewards

        @algorithms.register_policy_loss("mine", loss_agg="token_sum_norm", options=("kl_coef",))
        def mine_loss(logprobs, advantages, mask, **_):
            return -advantages * logprobs, {}

        cfg = load_config(None, ["algorithm.name=mine", "algorithm.kl_coef=0.1"])  # mine takes kl_coef
        assert (cfg.algorithm.std_normalize, cfg.algorithm.loss_agg) == (True, "token_sum_norm")
        with pytest.raises(ConfigError, match=r"algorithm.num_iterations=2 does not apply to mine .* it takes kl_coef"):
            load_config(None, ["algorithm.name=mine", "algorithm.num_iterations=2"])
        with pytest.raises(ConfigError, match="algorithm.std_normalize=false does not apply to mine"):
            load_config(None, ["algorithm.name=mine", "algorithm.std_normalize=false"])
    finally:
        algorithms.ALGORITHMS.pop("mine", None)
    with pytest.raises(ConfigError, match="algorithm.name must be one of cispo, dapo, dr_grpo, gpg, grpo, gspo, rloo; got 'mine'"):
        load_config(None, ["algorithm.name=mine"])


def test_task_options_are_checked_against_the_constructor_chain():
    from gpg_vl.registry import get_task_class, task_option_names

    # cvbench's __init__ takes **options and passes them to Task, which accepts none
    assert task_option_names(get_task_class("cvbench")) >= {"prompt_style", "multi_image", "shuffle_seed"}
    assert "options" not in task_option_names(get_task_class("cvbench"))
    with pytest.raises(ConfigError, match="task 'cvbench' has no option prompt; its options: .*prompt_style"):
        load_config(None, ["task.name=cvbench", "task.options={prompt: base}"])
    assert load_config(None, ["task.name=cvbench", "task.options={prompt_style: base}"]).task.options == {"prompt_style": "base"}
