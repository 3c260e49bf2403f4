"""The generic task: prompts, options, loaders (relative paths, image lists, bytes), one-line data errors,
weighted scores and metrics, reward functions batched per call, the synthetic twin, and a 2-step CLI run
whose metrics.jsonl holds a `reward/<name>` key for every configured reward."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from gpg_vl import get_task
from gpg_vl.cli import main
from gpg_vl.config import ConfigError
from gpg_vl.data import DataError
from gpg_vl.images import message_images
from gpg_vl.parsing import R1_SYSTEM_PROMPT
from gpg_vl_tasks.generic import GenericTask
from gpg_vl_tasks.shapes import COLORS

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_DATA = ROOT / "examples" / "generic" / "data.jsonl"
QUESTION = "What colour is it?\n(A) red\n(B) blue"


def png(colour=(200, 30, 30), size=(32, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def wrap(answer: str) -> str:
    return f"<think>t</think><answer>{answer}</answer>"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def folder(tmp_path):
    """A data folder with two images under img/."""
    (tmp_path / "d" / "img").mkdir(parents=True)
    (tmp_path / "d" / "img" / "red.png").write_bytes(png((200, 30, 30), (32, 24)))
    (tmp_path / "d" / "img" / "blue.png").write_bytes(png((30, 30, 200), (40, 40)))
    return tmp_path / "d"


# ---- prompts and options --------------------------------------------------------------------------


def test_registered_and_default_prompts_are_golden():
    task = get_task("generic")
    assert isinstance(task, GenericTask) and [r.name for r in task.rewards] == ["format", "exact"]
    example = {"question": "How many dots?", "images": [Image.new("RGB", (8, 8))]}
    assert task.prompt_text(example) == (
        "How many dots?\nOutput the thinking process in <think> </think> and final answer in <answer> </answer> tags."
    )
    base = get_task("generic", prompt_style="base").messages(example)
    assert [m["role"] for m in base] == ["system", "user", "assistant"]
    assert base[0]["content"] == R1_SYSTEM_PROMPT and base[2]["content"] == "<think>"
    assert base[1]["content"][1] == {"type": "text", "text": "How many dots?"}


def test_a_prompt_template_keeps_its_other_braces():
    task = get_task("generic", prompt='{question} Answer in JSON: {"bbox_2d": [x1, y1, x2, y2]}')
    assert task.prompt_text({"question": "Where is the cat?"}) == 'Where is the cat? Answer in JSON: {"bbox_2d": [x1, y1, x2, y2]}'


@pytest.mark.parametrize(
    "options, message",
    [
        ({"prompt_style": "chat"}, r"prompt_style must be one of \('instruct', 'base'\), got 'chat'"),
        ({"prompt": "Describe the image."}, r"prompt must be text holding the placeholder \{question\}"),
        ({"question_column": ""}, r"question_column must be a column name"),
        ({"rewards": {"acc": 1.0}}, r"unknown reward 'acc'; built-in rewards: format, choice"),
        ({"rewards": {"format": float("inf")}}, r"weight must be a finite number, got inf"),
    ],
)
def test_bad_options_are_one_line_config_errors(options, message):
    with pytest.raises(ConfigError, match=message) as info:
        get_task("generic", **options)
    assert "\n" not in str(info.value)


def test_unknown_option_is_rejected_by_the_config():
    from gpg_vl.config import load_config

    with pytest.raises(ConfigError, match="task 'generic' has no option reward; its options: answer_column"):
        load_config(None, ["task.name=generic", "task.options={reward: {format: 1}}"])


# ---- loading --------------------------------------------------------------------------------------


def test_jsonl_with_relative_paths_and_image_lists(folder, tmp_path, monkeypatch):
    data = write_jsonl(folder / "data.jsonl", [
        {"image": "img/red.png", "problem": QUESTION, "solution": "(A)"},
        {"id": "two", "image": ["img/blue.png", "img/red.png"], "problem": QUESTION, "solution": "(B)"},
    ])
    monkeypatch.chdir(tmp_path)  # paths resolve against the file's folder, not the working directory
    task = get_task("generic", rewards={"choice": 1.0})
    examples = task.load("d/data.jsonl")
    monkeypatch.chdir(ROOT)  # and keep working after a change of directory
    sizes = [[im.size for im in message_images(task.messages(e))] for e in examples]
    assert sizes == [[(32, 24)], [(40, 40), (32, 24)]]
    assert [task.example_id(e, i) for i, e in enumerate(examples)] == ["0", "two"]
    assert task.score(wrap("blue"), examples[1]).total == 1.0
    json.dumps(task.record_fields(examples[1]))  # records stay JSON-safe
    assert data.is_file()


def test_parquet_with_image_bytes_and_other_column_names(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "picture": [png((30, 30, 200)), png((200, 30, 30))],
        "q": ["Which colour?", "Which colour?"],
        "label": ["blue", "red"],
    })
    pq.write_table(table, tmp_path / "train.parquet")
    task = get_task("generic", image_column="picture", question_column="q", answer_column="label",
                    rewards={"exact": 1.0, "contains": 1.0})  # fmt: skip
    examples = task.load(str(tmp_path / "train.parquet"))
    assert message_images(task.messages(examples[0]))[0].getpixel((0, 0)) == (30, 30, 200)
    assert task.score(wrap("Blue"), examples[0]).components == {"exact": 1.0, "contains": 1.0}
    assert task.score(wrap("dark blue"), examples[0]).components == {"exact": 0.0, "contains": 1.0}


def test_parquet_with_datasets_image_dicts(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # a datasets Image column is stored as {"bytes", "path"}; the bytes win over a path that is not there
    image = pa.array([{"bytes": png(), "path": "gone.png"}], pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": image, "problem": ["Colour?"], "solution": ["red"]}), tmp_path / "t.parquet")
    task = get_task("generic")
    (example,) = task.load(str(tmp_path / "t.parquet"))
    assert message_images(task.messages(example))[0].size == (32, 24)


def test_a_missing_column_names_it_the_file_and_the_columns_present(folder):
    data = write_jsonl(folder / "data.jsonl", [{"image": "img/red.png", "question": "Colour?", "solution": "red"}])
    with pytest.raises(DataError) as info:
        get_task("generic").load(str(data))
    message = str(info.value)
    assert f"{data} (split 'train') row 0: no column 'problem' (columns: image, question, solution)" in message
    assert "task.options.question_column" in message and "\n" not in message


@pytest.mark.parametrize(
    "row, message",
    [
        ({"image": "img/none.png", "problem": "Q?", "solution": "red"}, r"row 0 column 'image': image file not found"),
        ({"image": [], "problem": "Q?", "solution": "red"}, r"empty list of images"),
        ({"image": "img/red.png", "problem": "  ", "solution": "red"}, r"'problem' must be non-empty text"),
        ({"image": "img/red.png", "problem": "Q?", "solution": "red", "choices": "red"}, r"'choices' must be a non-empty list"),
        ({"image": "img/red.png", "problem": "Q?", "solution": "red"}, r"reward 'choice' cannot use column 'solution': answer 'red' is neither"),
    ],
)
def test_bad_rows_are_one_line_data_errors(folder, row, message):
    data = write_jsonl(folder / "data.jsonl", [row])
    with pytest.raises(DataError, match=message) as info:
        get_task("generic", rewards={"format": 1.0, "choice": 1.0}).load(str(data))
    assert "\n" not in str(info.value)


def test_no_data_given_says_what_to_set():
    task = get_task("generic")
    with pytest.raises(DataError, match="set task.train_data"):
        task.load(None, "train")
    with pytest.raises(DataError, match="set task.eval_data.*eval.at_end=false"):
        task.load(None, "test")


def test_the_ten_row_example_loads_and_its_answers_match_its_images():
    task = get_task("generic", rewards={"format": 0.5, "choice": 1.0})
    examples = task.load(str(EXAMPLE_DATA))
    assert len(examples) == 10
    names = {(220, 40, 40): "red", (40, 170, 60): "green", (40, 80, 220): "blue", (235, 205, 30): "yellow"}  # as drawn
    for example in examples:
        image = message_images(task.messages(example))[0]
        if example["question"].startswith("What colour"):
            colour = next(names[c] for c, _ in Counter(image.getdata()).most_common() if c in names)
            assert task.score(wrap(colour), example).components["choice"] == 1.0, example["id"]


# ---- scoring --------------------------------------------------------------------------------------


def example(answer="(B)", question=QUESTION, **row) -> dict:
    return GenericTask(rewards={"format": 1.0})._example(
        {"image": png(), "problem": question, "solution": answer, **row}, 0, None, "test row 0")


def test_score_is_the_weighted_sum_and_metrics_are_component_means():
    task = get_task("generic", rewards={"format": 0.5, "choice": 1.0})
    ex = example()
    assert task.score(wrap("(B)"), ex).total == 1.5
    assert task.score("(B)", ex).components == {"format": 0.0, "choice": 0.0}
    assert task.score("", ex).total == 0.0
    assert task.score("<answer>" * 200_000, ex).total == 0.0
    metrics = task.metrics([ex] * 4, [wrap("(B)"), wrap("(A)"), "(B)", wrap("blue")])
    assert metrics == {"format": 0.75, "choice": 0.5, "accuracy": 0.5}
    assert "accuracy" not in get_task("generic", rewards={"format": 1.0}).metrics([ex], [wrap("x")])
    with pytest.raises(ValueError, match="1 examples but 2 completions"):
        task.metrics([ex], ["a", "b"])


def test_base_prompts_are_scored_on_the_whole_turn():
    task = get_task("generic", prompt_style="base", rewards={"format": 1.0, "choice": 1.0})
    # the prompt ended in "<think>", so the completion starts inside the thought
    assert task.score("t</think><answer>(B)</answer>", example()).total == 2.0


FUNCTION = '''
def batch_size(completions, solution, difficulty, **columns):
    """The number of completions it was called with, for every completion."""
    assert len(solution) == len(difficulty) == len(completions)
    return [float(len(completions))] * len(completions)
'''


def test_reward_functions_see_the_row_columns_one_at_a_time_in_score(tmp_path):
    path = tmp_path / "fns.py"
    path.write_text(FUNCTION)
    task = get_task("generic", rewards={"format": 1.0, f"{path}:batch_size": 0.25})
    ex = example(difficulty=3)
    assert task.score(wrap("x"), ex).components == {"format": 1.0, "batch_size": 1.0}  # lists of length 1
    assert task.score(wrap("x"), ex).total == 1.25
    assert task.metrics([ex] * 3, ["a", "b", "c"])["batch_size"] == 3.0  # one call for the whole batch
    clash = example(completions="x")
    with pytest.raises(DataError, match="a column named 'completions'"):
        task._example(clash["row"], 0, None, "test row 0")


def test_synthetic_twin_is_deterministic_and_its_answers_match_the_pixels():
    task = get_task("generic", rewards={"format": 1.0, "choice": 1.0, "exact": 1.0})
    first, again = task.load("synthetic:8", "train"), task.load("synthetic:3", "train")
    test = task.load("synthetic:8", "test")
    assert [e["answer"] for e in first[:3]] == [e["answer"] for e in again]
    assert [e["images"][0].tobytes() for e in first] != [e["images"][0].tobytes() for e in test]
    for ex in first:
        colours = Counter(ex["images"][0].getdata())
        assert COLORS[ex["answer"]] in colours and ex["choices"] == list(COLORS)
        letter = "ABCD"[list(COLORS).index(ex["answer"])]
        assert task.score(wrap(f"({letter})"), ex).components == {"format": 1.0, "choice": 1.0, "exact": 0.0}
        assert task.score(wrap(ex["answer"]), ex).total == 3.0


# ---- the trainer, end to end ----------------------------------------------------------------------


def test_two_step_cli_run_logs_every_reward_component(tmp_path):
    fns = tmp_path / "fns.py"
    fns.write_text("def short(completions, **columns):\n    return [float(len(c) < 40) for c in completions]\n")
    out = tmp_path / "run"
    code = main([
        "train", "--config", str(ROOT / "configs" / "generic_example.yaml"),
        "model.name_or_path=builtin:tiny", "model.min_pixels=3136", "model.max_pixels=3136",
        f"task.train_data={EXAMPLE_DATA}", f"task.eval_data={EXAMPLE_DATA}", "task.eval_limit=4",
        f'task.options={{rewards: {{format: 0.5, choice: 1.0, "{fns}:short": 0.1}}}}',
        "rollout.group_size=4", "rollout.max_new_tokens=6", "train.prompts_per_step=4",
        "optim.micro_batch_size=16", "train.max_steps=2", f"train.output_dir={out}",
        "eval.every=0", "eval.at_end=true", "eval.max_new_tokens=6", "logging.progress_bar=false",
        "logging.tensorboard=false", "logging.sample_every=0", "checkpoint.save_every=0",
    ])  # fmt: skip
    assert code == 0
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    assert {"reward/format", "reward/choice", "reward/short"} <= set(log[0])
    assert {"eval/format", "eval/choice", "eval/short", "eval/accuracy"} <= set(log[-1])


def test_cli_run_with_a_bad_reward_fails_in_one_line(tmp_path, capsys):
    code = main(["train", "--config", str(ROOT / "configs" / "generic_example.yaml"), "model.name_or_path=builtin:tiny",
                 "task.options={rewards: {accuracy: 1.0}}", f"train.output_dir={tmp_path}", "logging.progress_bar=false"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "unknown reward 'accuracy'" in err and len(err.splitlines()) == 1
