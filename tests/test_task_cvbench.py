"""The cvbench task: prompts, rewards, metrics, SAT / CV-Bench loaders on fixture files, the synthetic twin."""

from __future__ import annotations

import io
import json
import re
import time
from collections import deque

import numpy as np
import pytest
from PIL import Image

from gpg_vl import get_task
from gpg_vl.data import DataError
from gpg_vl.images import message_images
from gpg_vl.parsing import match_choice
from gpg_vl_tasks.cvbench import CVBenchTask, lmms_eval_overall
from gpg_vl_tasks._synthetic import BACKGROUND, COLOURS

INSTRUCTION = "Output the thinking process in <think> </think> and final answer in <answer> </answer> tags."
PROMPT = "How many organs are in the image? Select from the following choices.\n(A) 3\n(B) 2\n(C) 1\n(D) 0"


def png(colour=(200, 30, 30), size=(32, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def cv_example(**fields) -> dict:
    example = {
        "id": "0", "images": [Image.new("RGB", (32, 32))], "question": "How many organs are in the image?",
        "choices": ["3", "2", "1", "0"], "answer": "(C)", "prompt": PROMPT, "task": "Count", "type": "2D",
        "source": "ADE20K",
    }
    return {**example, **fields}


def answer(text: str) -> str:
    return f"<think>I count them.</think><answer>{text}</answer>"


# ---- registry and options ---------------------------------------------------------------------------


def test_registry_finds_the_task_and_checks_options():
    task = get_task("cvbench")
    assert isinstance(task, CVBenchTask) and task.name == "cvbench"
    assert (task.default_train_data, task.default_eval_data) == ("array/SAT", "nyu-visionx/CV-Bench")
    with pytest.raises(TypeError, match="unknown options"):
        get_task("cvbench", colour="red")
    with pytest.raises(ValueError, match="prompt_style"):
        get_task("cvbench", prompt_style="chat")


# ---- prompts ----------------------------------------------------------------------------------------


def test_instruct_prompt_golden():
    example = cv_example()
    messages = CVBenchTask().messages(example)
    assert len(messages) == 1 and messages[0]["role"] == "user"
    image, text = messages[0]["content"]
    assert image["type"] == "image" and isinstance(image["image"], Image.Image)
    assert text == {
        "type": "text",
        "text": "How many organs are in the image? Select from the following choices.\n(A) 3\n(B) 2\n(C) 1\n(D) 0\n"
        "Output the thinking process in <think> </think> and final answer in <answer> </answer> tags.",
    }


def test_base_prompt_golden():
    messages = CVBenchTask(prompt_style="base").messages(cv_example())
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[0]["content"] == (
        "A conversation between User and Assistant. The user asks a question, and the Assistant "
        "solves it. The assistant first thinks about the reasoning process in the mind and then provides the user "
        "with the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> "
        "</answer> tags, respectively, i.e., <think> reasoning process here </think><answer> answer here </answer>"
    )
    assert messages[1]["content"][0]["type"] == "image"
    assert messages[1]["content"][1] == {"type": "text", "text": PROMPT}
    assert messages[2] == {"role": "assistant", "content": "<think>"}


# ---- rewards ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, fmt, acc",
    [
        (answer("(C)"), 1, 1),
        (answer("C"), 1, 1),
        (answer(" c. "), 1, 1),
        (answer("1"), 1, 1),  # the right choice text
        (answer("(C) 1"), 1, 1),
        (answer("B"), 1, 0),
        (answer("2"), 1, 0),
        (answer("A or C"), 1, 0),  # several letters is no answer
        (answer("(B) (C)"), 1, 0),
        (answer("(E)"), 1, 0),  # not a choice
        (answer(""), 1, 0),
        ("The answer is (C).", 0, 0),  # malformed: no tags, no credit
        ("<answer>(C)</answer>", 0, 1),  # accuracy needs only the answer block
        ("<think>x</think><answer>(C)</answer> trailing", 0, 1),
        ("", 0, 0),
        ("<think><think>x</think></think><answer>(C)</answer>", 0, 1),
        ("<think>x</think><answer><answer>(C)</answer></answer>", 0, 0),  # nested answer tags earn nothing
        (answer("（C）选项 ☃"), 1, 1),  # full-width parentheses still name C
        (answer("ß (D) 選"), 1, 0),
    ],
)
def test_score_cases(completion, fmt, acc):
    reward = CVBenchTask().score(completion, cv_example())
    assert reward.components == {"format": fmt, "accuracy": acc}
    assert reward.total == fmt + acc


def test_score_adversarial_strings_stay_in_range_and_fast():
    task, example = CVBenchTask(), cv_example()
    adversarial = [
        "<think>" + "a" * 100_000 + "</think><answer>(C)</answer>",
        "<answer>" * 20_000 + "(C)" + "</answer>" * 20_000,
        "<think>" * 30_000,
        "(C) " * 30_000,
        "\x00\ud800\uffff" * 1000,
        "<think>ü</think><answer>" + "C" * 50_000 + "</answer>",
    ]
    start = time.perf_counter()
    for text in adversarial:
        reward = task.score(text, example)
        assert 0.0 <= reward.total <= 2.0
    assert time.perf_counter() - start < 2.0
    assert task.score(None, example).total == 0.0  # not a string: scored, not raised


def test_thousand_scores_take_well_under_a_second_or_two():
    task, example = CVBenchTask(), cv_example()
    completions = [answer("(C)"), answer("B"), "junk", "<think>" + "x" * 2000 + "</think><answer>1</answer>"] * 250
    start = time.perf_counter()
    totals = [task.score(c, example).total for c in completions]
    assert time.perf_counter() - start < 2.0
    assert set(totals) == {2.0, 1.0, 0.0}


def test_base_style_scores_a_continuation_of_the_think_prefix():
    base, example = CVBenchTask(prompt_style="base"), cv_example()
    assert base.score("I count.</think><answer>(C)</answer>", example).total == 2.0
    assert base.score("<think>I count.</think><answer>(C)</answer>", example).total == 2.0
    assert CVBenchTask().score("I count.</think><answer>(C)</answer>", example).components["format"] == 0.0


@pytest.mark.parametrize(
    "text, choices, expected",
    [
        ("left", ["left", "right"], 0),
        ("It is on the right side.", ["left", "right"], 1),
        ("left or right", ["left", "right"], None),
        ("A chair", ["lamp", "chair"], 1),  # the article, not option A
        ("A", ["lamp", "chair"], 0),
        ("A is closer", ["lamp", "chair"], 0),
        ("I think B", ["lamp", "chair"], 1),
        ("(b)", ["lamp", "chair"], 1),
        ("B. chair", ["lamp", "chair"], 1),
        ("the red chair", ["chair", "red chair"], None),  # names both texts: ambiguous, no credit
        ("red chair", ["chair", "red chair"], 1),
        ("the armchair", ["chair", "lamp"], None),  # whole words only
        (None, ["lamp", "chair"], None),
    ],
)
def test_match_choice(text, choices, expected):
    assert match_choice(text, choices) == expected


# ---- metrics ----------------------------------------------------------------------------------------


def test_metrics_hand_computed_total_differs_from_the_per_source_average():
    # ADE20K Count 4/4 right, COCO Relation 0/2, Omni3D Depth 1/2 and Distance 2/2.
    # Total (micro) = (4 + 0 + 1 + 2) / 10 = 0.7.
    # lmms-eval: 2D = (ADE20K 1.0 + COCO 0.0) / 2 = 0.5; 3D = Omni3D 3/4 = 0.75; overall = (0.5 + 0.75) / 2 = 0.625.
    plan = [("Count", "2D", "ADE20K", True)] * 4 + [("Relation", "2D", "COCO", False)] * 2
    plan += [("Depth", "3D", "Omni3D", True), ("Depth", "3D", "Omni3D", False)] + [("Distance", "3D", "Omni3D", True)] * 2
    examples = [cv_example(id=str(i), task=t, type=k, source=s) for i, (t, k, s, _) in enumerate(plan)]
    completions = [answer("(C)" if ok else "(A)") for *_, ok in plan]
    completions[0] = "<answer>(C)</answer>"  # right answer, broken format: counts for accuracy, not for format
    metrics = CVBenchTask().metrics(examples, completions)
    assert metrics == pytest.approx(
        {"Count": 1.0, "Relation": 0.0, "Depth": 0.5, "Distance": 1.0, "Total": 0.7, "lmms_eval_overall": 0.625,
         "format": 0.9}
    )
    assert all(0.0 <= v <= 1.0 for v in metrics.values())


def test_metrics_without_cvbench_types_report_total_only():
    examples = [cv_example(task="obj_movement", type="", source="SAT")] * 2
    metrics = CVBenchTask().metrics(examples, [answer("(C)"), answer("(A)")])
    assert metrics == {"Total": 0.5, "format": 1.0}
    assert lmms_eval_overall(examples, [1.0, 0.0]) is None
    with pytest.raises(ValueError):
        CVBenchTask().metrics(examples, [answer("(C)")])


# ---- loaders on fixture files in the real schemas ------------------------------------------------------


def write_sat_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [("image_bytes", pa.list_(pa.binary())), ("question", pa.string()), ("answers", pa.list_(pa.string())),
         ("question_type", pa.string()), ("correct_answer", pa.string())]
    )
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


SAT_ROWS = [
    {"image_bytes": [png()], "question": "Is the lamp left of the sofa?", "answers": ["yes", "no"],
     "question_type": "spatial", "correct_answer": "yes"},
    {"image_bytes": [png(), png((0, 0, 200))], "question": "Did the camera turn left?", "answers": ["left", "right"],
     "question_type": "ego_movement", "correct_answer": "right"},
    {"image_bytes": [png()], "question": "How many chairs?", "answers": ["1", "2", "3", "4"],
     "question_type": "count", "correct_answer": "3"},
]


def test_sat_parquet_single_image_by_default_multi_image_on_request(tmp_path):
    file = tmp_path / "SAT_train.parquet"
    write_sat_parquet(file, SAT_ROWS)
    examples = CVBenchTask().load(str(file), split="train")
    assert [e["question"] for e in examples] == ["Is the lamp left of the sofa?", "How many chairs?"]
    for example, row in zip(examples, [SAT_ROWS[0], SAT_ROWS[2]]):
        assert sorted(example["choices"]) == sorted(row["answers"])
        assert example["choices"][ord(example["answer"][1]) - ord("A")] == row["correct_answer"]
        assert re.fullmatch(r"\([A-D]\)", example["answer"]) and example["source"] == "SAT"
        assert example["prompt"].startswith(row["question"] + " Select from the following choices.\n(A) ")
    assert examples[1]["task"] == "count"
    # the shuffle is seeded: same order on reload, and the correct answer is not always first
    assert [e["choices"] for e in CVBenchTask().load(str(file))] == [e["choices"] for e in examples]
    multi = CVBenchTask(multi_image=True).load(str(file))
    assert len(multi) == 3
    content = CVBenchTask().messages(multi[1])[0]["content"]
    assert [c["type"] for c in content] == ["image", "image", "text"]
    assert content[1]["image"].getpixel((0, 0)) == (0, 0, 200)


def test_sat_bad_row_names_file_and_row(tmp_path):
    file = tmp_path / "bad.parquet"
    write_sat_parquet(file, [SAT_ROWS[0], {**SAT_ROWS[2], "correct_answer": "7"}])
    with pytest.raises(DataError, match=r"bad\.parquet.*row 1.*correct_answer"):
        CVBenchTask().load(str(file))


CV_ROWS = [
    {"idx": 0, "type": "2D", "task": "Count", "question": "How many organs are in the image?",
     "choices": ["3", "2", "1", "0"], "answer": "(C)", "prompt": PROMPT, "filename": "img/2D/count/ade20k_10.png",
     "source": "ADE20K"},
    {"idx": 1, "type": "3D", "task": "Depth", "question": "Which object is closer to the camera, the lamp or the bed?",
     "choices": ["lamp", "bed"], "answer": "(B)",
     "prompt": "Which object is closer to the camera, the lamp or the bed? Select from the following choices.\n(A) lamp\n(B) bed",
     "filename": "img/3D/depthorder/omni3d_1.png", "source": "Omni3D"},
]


def test_cvbench_parquet_in_hub_schema(tmp_path):
    import datasets

    rows = [{**row, "image": {"bytes": png(size=(40, 30)), "path": None}} for row in CV_ROWS]
    features = datasets.Features(
        {"idx": datasets.Value("int32"), "type": datasets.Value("string"), "task": datasets.Value("string"),
         "image": datasets.Image(), "question": datasets.Value("string"),
         "choices": datasets.Sequence(datasets.Value("string")), "answer": datasets.Value("string"),
         "prompt": datasets.Value("string"), "filename": datasets.Value("string"), "source": datasets.Value("string")}
    )
    file = tmp_path / "test.parquet"
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(file))
    examples = CVBenchTask().load(str(file), split="test")
    assert [(e["id"], e["task"], e["type"], e["source"], e["answer"]) for e in examples] == [
        ("0", "Count", "2D", "ADE20K", "(C)"), ("1", "Depth", "3D", "Omni3D", "(B)")
    ]
    assert examples[1]["prompt"] == CV_ROWS[1]["prompt"]
    assert message_images(CVBenchTask().messages(examples[0]))[0].size == (40, 30)
    assert CVBenchTask().record_fields(examples[1]) == {
        "id": "1", "task": "Depth", "type": "3D", "source": "Omni3D", "question": CV_ROWS[1]["question"],
        "choices": ["lamp", "bed"], "answer": "(B)"}
    assert CVBenchTask().score(answer("bed"), examples[1]).total == 2.0


def test_cvbench_jsonl_with_image_folder(tmp_path):
    for row in CV_ROWS:
        (tmp_path / row["filename"]).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / row["filename"]).write_bytes(png(size=(20, 10)))
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(row) for row in CV_ROWS) + "\n")
    examples = CVBenchTask().load(str(tmp_path / "test.jsonl"), split="test")
    assert [e["id"] for e in examples] == ["0", "1"]
    assert message_images(CVBenchTask().messages(examples[1]))[0].size == (20, 10)
    (tmp_path / CV_ROWS[1]["filename"]).unlink()
    with pytest.raises(DataError, match=r"test\.jsonl.*row 1.*not found"):
        CVBenchTask().load(str(tmp_path / "test.jsonl"), split="test")


def test_bad_answer_letter_fails_loudly(tmp_path):
    (tmp_path / "a.png").write_bytes(png())
    row = {**CV_ROWS[0], "filename": "a.png", "answer": "(F)"}
    (tmp_path / "t.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"t\.jsonl.*row 0.*answer"):
        CVBenchTask().load(str(tmp_path / "t.jsonl"), split="test")


# ---- the synthetic twin ---------------------------------------------------------------------------------


def mask(image: Image.Image, colour: str) -> np.ndarray:
    return np.all(np.asarray(image) == COLOURS[colour], axis=-1)


def components(m: np.ndarray) -> int:
    seen, count = np.zeros_like(m), 0
    for y, x in zip(*np.nonzero(m)):
        if seen[y, x]:
            continue
        count += 1
        queue = deque([(y, x)])
        seen[y, x] = True
        while queue:
            cy, cx = queue.popleft()
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < m.shape[0] and 0 <= nx < m.shape[1] and m[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
    return count


def centroid(m: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(m)
    return np.array([xs.mean(), ys.mean()])


def right_text(example: dict) -> str:
    return example["choices"][ord(example["answer"][1]) - ord("A")]


def test_synthetic_answers_are_true_of_the_pixels():
    examples = CVBenchTask().load("synthetic:48", split="train")
    assert [e["task"] for e in examples[:4]] == ["Count", "Relation", "Depth", "Distance"]
    for example in examples:
        image = example["images"][0]
        question, truth = example["question"], right_text(example)
        assert example["source"] == "synthetic" and example["type"] == ("2D" if example["task"] in ("Count", "Relation") else "3D")
        assert set(map(tuple, np.asarray(image).reshape(-1, 3))) <= {BACKGROUND, *COLOURS.values()}
        if example["task"] == "Count":
            colour = re.match(r"How many (\w+) ", question).group(1)
            assert components(mask(image, colour)) == int(truth)
        elif example["task"] == "Relation":
            a, b = re.search(r"positions of the (\w+) \w+ and the (\w+) \w+", question).groups()
            (ax, ay), (bx, by) = centroid(mask(image, a)), centroid(mask(image, b))
            assert {"left": ax < bx, "right": ax > bx, "above": ay < by, "below": ay > by}[truth]
        elif example["task"] == "Depth":
            other = next(c for c in example["choices"] if c != truth)
            assert mask(image, truth.split()[0]).sum() > mask(image, other.split()[0]).sum()
        else:
            ref = re.search(r"closer to the (\w+) \w+,", question).group(1)
            other = next(c for c in example["choices"] if c != truth)
            r = centroid(mask(image, ref))
            near, far = centroid(mask(image, truth.split()[0])), centroid(mask(image, other.split()[0]))
            assert np.linalg.norm(near - r) < np.linalg.norm(far - r)
        assert CVBenchTask().score(answer(example["answer"]), example).total == 2.0


def test_synthetic_is_deterministic_and_splits_differ():
    task = CVBenchTask(synthetic_image_size=160)
    a, b = task.load("synthetic:12", split="train"), task.load("synthetic:12", split="train")
    assert [e["prompt"] for e in a] == [e["prompt"] for e in b]
    assert all(x["images"][0].tobytes() == y["images"][0].tobytes() for x, y in zip(a, b))
    assert a[0]["images"][0].size == (160, 160)
    test = task.load("synthetic:12", split="test")
    assert [e["prompt"] for e in a] != [e["prompt"] for e in test]
    assert [e["prompt"] for e in task.load("synthetic:4", split="train")] == [e["prompt"] for e in a[:4]]
    assert len(task.load("synthetic", split="test")) == 1000
    metrics = task.metrics(test, [answer(e["answer"]) for e in test])
    assert metrics["Total"] == metrics["lmms_eval_overall"] == 1.0


def test_easy_count_twin_is_true_of_the_pixels_with_choices_1_to_4_in_order():
    task = CVBenchTask(synthetic_tasks=["Count"], synthetic_easy=True)
    examples = task.load("synthetic:40", split="train")
    assert {e["task"] for e in examples} == {"Count"}
    assert {right_text(e) for e in examples} == {"1", "2", "3", "4"}  # every count occurs
    for example in examples:
        assert example["choices"] == ["1", "2", "3", "4"] and example["prompt"].endswith("(D) 4")
        colour = re.match(r"How many (\w+) ", example["question"]).group(1)
        image = example["images"][0]
        assert components(mask(image, colour)) == int(right_text(example))
        assert set(map(tuple, np.asarray(image).reshape(-1, 3))) <= {BACKGROUND, COLOURS[colour]}  # no distractors
    with pytest.raises(ValueError, match="subset of"):
        CVBenchTask(synthetic_tasks=["Counting"])
