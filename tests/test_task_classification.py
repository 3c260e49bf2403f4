"""The classification task: prompts, exact/contains rewards, metrics, loaders on fixture files, the synthetic twin."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
from PIL import Image

from gpg_vl import get_task
from gpg_vl.data import DataError
from gpg_vl.images import message_images
from gpg_vl_tasks._synthetic import COLOURS
from gpg_vl.parsing import answer_matches
from gpg_vl_tasks.classification import DATASETS, ClassificationTask
from gpg_vl_tasks.classification_synthetic import CLASSES

FLOWER_QUESTION = "This is an image containing a plant. Please identify the species of the plant based on the image."
VIRFT_PROBLEM = (
    " This is an image containing a plant. Please identify the species of the plant based on the image.\n"
    "Output the thinking process in <think> </think> and final answer in <answer> </answer> tags."
    "The output answer format should be as follows:\n<think> ... </think> <answer>species name</answer>\n"
    "Please strictly follow the format. "
)


def png(colour=(200, 30, 30), size=(32, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def example(label="pink primrose", **fields) -> dict:
    return {"id": "0", "image": Image.new("RGB", (16, 16)), "label": label, "question": FLOWER_QUESTION,
            "problem": VIRFT_PROBLEM, "dataset": "flowers", **fields}


def answer(text: str) -> str:
    return f"<think>The petals are pink.</think><answer>{text}</answer>"


# ---- registry and options ---------------------------------------------------------------------------


def test_registry_datasets_and_options():
    task = get_task("classification")
    assert isinstance(task, ClassificationTask) and task.default_train_data == "laolao77/ViRFT_CLS_flower_4_shot"
    ids = {name: get_task("classification", dataset=name).default_train_data for name in DATASETS}
    assert ids == {
        "flowers": "laolao77/ViRFT_CLS_flower_4_shot", "pets": "laolao77/ViRFT_CLS_pets37_4shot",
        "aircraft": "laolao77/ViRFT_CLS_fgvc_aircraft_4_shot", "cars": "laolao77/ViRFT_CLS_car196_4shot",
    }
    for bad in ({"dataset": "birds"}, {"match": "fuzzy"}, {"prompt_style": "chat"}):
        with pytest.raises(ValueError):
            get_task("classification", **bad)
    with pytest.raises(TypeError, match="unknown options"):
        get_task("classification", shots=4)


# ---- prompts ----------------------------------------------------------------------------------------


def test_instruct_prompt_golden():
    (message,) = ClassificationTask().messages(example())
    assert message["role"] == "user" and message["content"][0]["type"] == "image"
    assert message["content"][1] == {
        "type": "text",
        "text": "This is an image containing a plant. Please identify the species of the plant based on the image.\n"
        "Output the thinking process in <think> </think> and final answer in <answer> </answer> tags.",
    }
    pets = ClassificationTask(dataset="pets")
    assert pets.question == "This is an image containing a pet. Please identify the species of the pet based on the image."
    cars = ClassificationTask(dataset="cars")
    assert cars.question == "This is an image containing a car. Please identify the model of the car based on the image."


def test_base_prompt_golden_and_row_problem():
    messages = ClassificationTask(prompt_style="base").messages(example())
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[0]["content"].startswith("A conversation between User and Assistant.")
    assert messages[0]["content"].endswith("<think> reasoning process here </think><answer> answer here </answer>")
    assert messages[1]["content"][1] == {"type": "text", "text": FLOWER_QUESTION}
    assert messages[2] == {"role": "assistant", "content": "<think>"}
    (row,) = ClassificationTask(use_row_problem=True).messages(example())
    assert row["content"][1]["text"] == VIRFT_PROBLEM.strip()


# ---- rewards ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, fmt, exact, contains",
    [
        (answer("pink primrose"), 1, 1, 1),
        (answer("Pink_Primrose"), 1, 1, 1),  # case, spaces and underscores are normalised away
        (answer(" pink  primrose "), 1, 1, 1),
        (answer("rose"), 1, 0, 1),  # the paper's rule: 'rose' is inside 'pink primrose'
        (answer("a pink primrose flower"), 1, 0, 1),
        (answer("sunflower"), 1, 0, 0),
        (answer(""), 1, 0, 0),  # the paper's script scores an empty answer 1; an empty answer names nothing here
        ("pink primrose", 0, 0, 0),  # malformed: no answer block, no credit in either mode
        ("", 0, 0, 0),
        ("<answer>pink primrose</answer>", 0, 1, 1),
        ("<think>x</think><answer><answer>pink primrose</answer></answer>", 0, 0, 0),  # nested tags
        (answer("粉红 primrose ☃"), 1, 0, 0),
        (answer("Pink Primrose\u00a0"), 1, 1, 1),  # a non-breaking space is whitespace too
    ],
)
def test_score_cases(completion, fmt, exact, contains):
    for match, acc in (("exact", exact), ("contains", contains)):
        reward = ClassificationTask(match=match).score(completion, example())
        assert reward.components == {"format": fmt, "accuracy": acc}, match
        assert reward.total == fmt + acc


def test_contains_is_symmetric_and_exact_is_not():
    assert answer_matches("pink primrose", "rose", "contains") and answer_matches("rose", "pink primrose", "contains")
    assert not answer_matches("pink primrose", "rose", "exact")
    assert not answer_matches(None, "rose", "contains")


def test_adversarial_and_thousand_scores_are_fast():
    task = ClassificationTask(match="contains")
    adversarial = [
        "<think>" + "a" * 100_000 + "</think><answer>pink primrose</answer>",
        "<answer>" * 20_000 + "x" + "</answer>" * 20_000,
        "<think>" * 30_000,
        "\x00\ud800\uffff" * 1000,
        "<think>ü</think><answer>" + "rose " * 20_000 + "</answer>",
        None,
    ]
    start = time.perf_counter()
    for text in adversarial:
        assert 0.0 <= task.score(text, example()).total <= 2.0
    completions = [answer("pink primrose"), answer("lotus"), "junk", answer("x" * 2000)] * 250
    totals = [task.score(c, example()).total for c in completions]
    assert time.perf_counter() - start < 3.0
    assert set(totals) == {2.0, 1.0, 0.0}


def test_base_style_scores_a_continuation_of_the_think_prefix():
    assert ClassificationTask(prompt_style="base").score("pink.</think><answer>pink primrose</answer>", example()).total == 2.0
    assert ClassificationTask().score("pink.</think><answer>pink primrose</answer>", example()).total == 1.0


# ---- metrics ----------------------------------------------------------------------------------------


def test_metrics_hand_computed_exact_vs_contains():
    examples = [example(id=str(i), label=label) for i, label in enumerate(["pink primrose", "lotus", "rose", "tulip"])]
    completions = [answer("Pink Primrose"), answer("water lily"), answer("pink primrose"), "<answer></answer>"]
    # exact: only the first is right -> 1/4. contains: 1st, 3rd ('rose' in 'pinkprimrose') -> 2/4; the empty 4th
    # names nothing (Visual-RFT's script would score it 1).
    # format: the 4th has no think block -> 3/4.
    assert ClassificationTask().metrics(examples, completions) == {"accuracy": 0.25, "format": 0.75}
    assert ClassificationTask(match="contains").metrics(examples, completions) == {"accuracy": 0.5, "format": 0.75}
    with pytest.raises(ValueError):
        ClassificationTask().metrics(examples, completions[:2])


# ---- loaders on fixture files in the real schemas ------------------------------------------------------


def test_virft_parquet_in_hub_schema(tmp_path):
    import datasets

    rows = [
        {"image": Image.new("RGB", (40, 30), (10, 200, 10)), "problem": VIRFT_PROBLEM, "solution": "<answer>lotus</answer>"},
        {"image": Image.new("RGB", (40, 30), (200, 10, 10)), "problem": VIRFT_PROBLEM, "solution": "<answer>pink primrose</answer>"},
    ]
    features = datasets.Features(
        {"image": datasets.Image(), "problem": datasets.Value("string"), "solution": datasets.Value("string")}
    )
    file = tmp_path / "train-00000-of-00001.parquet"
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(file))
    task = ClassificationTask()
    examples = task.load(str(file), split="train")
    assert [e["label"] for e in examples] == ["lotus", "pink primrose"]
    assert message_images(task.messages(examples[0]))[0].getpixel((0, 0)) == (10, 200, 10)
    assert task.record_fields(examples[1]) == {"id": "train-1", "label": "pink primrose", "dataset": "flowers"}
    assert task.score(answer("Lotus"), examples[0]).total == 2.0
    assert task.load(str(tmp_path), split="train")[1]["label"] == "pink primrose"  # the folder works too


def test_jsonl_with_relative_image_paths(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png((1, 2, 3)))
    rows = [{"image": "imgs/a.png", "problem": VIRFT_PROBLEM, "solution": "<answer>english marigold</answer>"}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (example_,) = ClassificationTask().load(str(tmp_path / "train.jsonl"))
    assert example_["label"] == "english marigold"
    assert message_images(ClassificationTask().messages(example_))[0].getpixel((0, 0)) == (1, 2, 3)
    (tmp_path / "bad.jsonl").write_text(json.dumps({**rows[0], "image": "imgs/missing.png"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl.*row 0.*not found"):
        ClassificationTask().load(str(tmp_path / "bad.jsonl"))


def write_folder(root, labels_txt: str):
    (root / "images").mkdir(parents=True)
    for name, colour in (("a.jpg", (255, 0, 0)), ("b c.jpg", (0, 0, 255))):
        Image.new("RGB", (20, 20), colour).save(root / "images" / name)
    (root / "classnames.txt").write_text("pink primrose\nhard-leaved pocket orchid\n")
    (root / "labels.txt").write_text(labels_txt)


def test_image_folder_with_label_list_and_class_names(tmp_path):
    write_folder(tmp_path / "flowers", "images/a.jpg 0\nimages/b c.jpg 1\n\n")
    task = ClassificationTask()
    examples = task.load(str(tmp_path / "flowers"), split="test")
    assert [(e["id"], e["label"]) for e in examples] == [
        ("images/a.jpg", "pink primrose"), ("images/b c.jpg", "hard-leaved pocket orchid")
    ]
    assert message_images(task.messages(examples[1]))[0].getpixel((5, 5))[2] > 200


def test_image_folder_bad_label_names_file_and_line(tmp_path):
    write_folder(tmp_path / "f", "images/a.jpg 0\nimages/b c.jpg 2\n")
    with pytest.raises(DataError, match=r"labels\.txt:2"):
        ClassificationTask().load(str(tmp_path / "f"), split="test")


def test_image_folder_with_virft_pth_label_list(tmp_path):
    import torch

    root = tmp_path / "pets"
    write_folder(root, "")
    (root / "labels.txt").unlink()
    entries = [{"/mnt/data/oxford_pets/images/a.jpg": {"label": torch.tensor(1), "pred_class": torch.tensor([1, 0])}},
               {"/mnt/data/oxford_pets/images/b c.jpg": {"label": torch.tensor(0)}}]
    torch.save(entries, root / "labels.pth")
    examples = ClassificationTask(dataset="pets").load(str(root), split="test")
    assert [e["label"] for e in examples] == ["hard-leaved pocket orchid", "pink primrose"]
    assert examples[0]["question"].startswith("This is an image containing a pet.")


def test_no_default_eval_data():
    with pytest.raises(DataError, match="image folder"):
        ClassificationTask().load(None, split="test")


# ---- the synthetic twin ---------------------------------------------------------------------------------


@pytest.mark.parametrize("easy", [False, True])
def test_synthetic_labels_are_true_of_the_pixels(easy):
    task = ClassificationTask(synthetic_easy=easy)
    examples = task.load("synthetic:24", split="train")
    if easy:  # four classes, one colour each: the colour alone names the class
        labels = {e["label"] for e in examples}
        assert len(labels) == 4 and len({label.split()[0] for label in labels}) == 4
    else:
        assert sorted({e["label"] for e in examples}) == sorted(CLASSES) and len(CLASSES) == 12
    for e in examples:
        colour, shape = e["label"].split()
        pixels = np.all(np.asarray(e["image"]) == COLOURS[colour], axis=-1)
        ys, xs = np.nonzero(pixels)
        fill = pixels.sum() / ((np.ptp(xs) + 1) * (np.ptp(ys) + 1))  # share of its bounding box the shape covers
        expected = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}[shape]
        assert abs(fill - expected) < 0.08, (e["label"], fill)
        assert task.score(answer(e["label"]), e).total == 2.0
    assert "shape" in task.messages(examples[0])[0]["content"][1]["text"]


def test_synthetic_is_deterministic_and_splits_differ():
    task = ClassificationTask(synthetic_image_size=64)
    a, b = task.load("synthetic:6", split="train"), task.load("synthetic:6", split="train")
    assert all(x["image"].tobytes() == y["image"].tobytes() and x["label"] == y["label"] for x, y in zip(a, b))
    assert a[0]["image"].size == (64, 64)
    test = task.load("synthetic:6", split="test")
    assert any(x["image"].tobytes() != y["image"].tobytes() for x, y in zip(a, test))
    assert task.metrics(test, [answer(e["label"]) for e in test]) == {"accuracy": 1.0, "format": 1.0}
