"""Grounding tasks (LISA as Visual-RFT, RefCOCO as VLM-R1): prompts, IoU/GIoU rewards, rescaling, metrics, loaders."""

from __future__ import annotations

import io
import json
import time

import pytest
from PIL import Image

from gpg_vl import get_task as registry_get_task
from gpg_vl.data import DataError
from gpg_vl.images import ImageBudget, message_images, smart_resize as qwen2vl_resized_size
from gpg_vl.boxes import box_giou, box_iou, clip_box, rescale_box
from gpg_vl_tasks._synthetic import COLOURS

QWEN2_VL_BUDGET = ImageBudget(56 * 56, 28 * 28 * 1280, 28, "thousandths")  # Qwen2-VL's processor defaults


def get_task(name: str, **options):
    """A grounding task as the trainer hands it over: configured with a Qwen2-VL processor's budget."""
    task = registry_get_task(name, **options)
    task.configure_images(QWEN2_VL_BUDGET)
    return task

TARGET = [100.0, 200.0, 300.0, 400.0]  # a 200 x 200 box; on LISA's 0-1000 scale or in RefCOCO pixels


def _png(size=(500, 300), color=(0, 128, 0)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _lisa_example() -> dict:
    instruction = "the thing you sit on"
    return {"id": "0", "image": _png(), "instruction": instruction, "box": TARGET, "width": 500, "height": 300}


def _refcoco_example(width=500, height=300, box=(125.0, 75.0, 250.0, 150.0)) -> dict:
    image = _png((width, height))
    return {"id": "0", "image": image, "problem": "man in red", "box": list(box), "width": width, "height": height}


def _lisa(box: str) -> str:
    return f"<think>it is on the left</think><answer>{box}</answer>"


# ---- prompts ------------------------------------------------------------------------------------


def test_lisa_prompt_golden():
    messages = get_task("lisa").messages(_lisa_example())
    assert [m["role"] for m in messages] == ["user"]
    image, text = messages[0]["content"]
    assert image["type"] == "image" and image["image"].size == (500, 300)
    assert text["text"] == (
        "Output the bounding box in the image corresponding to the instruction: the thing you sit on "
        "Output the thinking process in <think> </think> and your grouding box. "
        'Following "<think> thinking process </think>\n<answer>(x1,y1),(x2,y2)</answer>)" format.'
    )


def test_refcoco_prompt_golden_and_base_style():
    (user,) = get_task("refcoco").messages(_refcoco_example())
    assert user["content"][1]["text"] == (
        "man in red First output the thinking process in <think> </think> tags and then output the final answer "
        "in <answer> </answer> tags. Output the final answer in JSON format."
    )
    base = get_task("refcoco", prompt_style="base").messages(_refcoco_example())
    assert [m["role"] for m in base] == ["system", "user", "assistant"] and base[-1]["content"] == "<think>"


def test_unknown_options_fail():
    with pytest.raises(TypeError, match="unknown options"):
        get_task("lisa", iou_threshold=0.5)
    with pytest.raises(ValueError, match="reward"):
        get_task("refcoco", reward="dice")


# ---- box arithmetic -----------------------------------------------------------------------------


def test_iou_and_giou_by_hand():
    a, b = (0, 0, 10, 10), (5, 5, 15, 15)
    # intersection 5*5 = 25, union 100 + 100 - 25 = 175
    assert box_iou(a, b) == pytest.approx(25 / 175)
    # enclosing box 15*15 = 225, empty share (225 - 175) / 225 = 2/9
    assert box_giou(a, b) == pytest.approx(1 / 7 - 2 / 9)
    # disjoint: IoU 0; enclosing 30*10 = 300, union 200 -> GIoU = -100/300
    assert box_giou((0, 0, 10, 10), (20, 0, 30, 10)) == pytest.approx(-1 / 3)
    assert box_iou(a, a) == box_giou(a, a) == 1.0


def test_clip_rejects_inverted_and_outside_boxes():
    assert clip_box((30, 40, 10, 50), 100, 100) is None  # x2 < x1
    assert clip_box((200, 200, 300, 300), 100, 100) is None  # entirely outside
    assert clip_box((-10, -10, 50, 150), 100, 100) == (0, 0, 50, 100)


def test_qwen2vl_resize_rule_by_hand():
    # 300 x 500 rounds to 308 x 504 = 155232 > 100352, so beta = sqrt(150000 / 100352) = 1.2226 and
    # the sides become floor(300 / 1.2226 / 28) * 28 = 224 and floor(500 / 1.2226 / 28) * 28 = 392.
    assert qwen2vl_resized_size(300, 500, 3136, 100352) == (224, 392)
    assert qwen2vl_resized_size(300, 500, 3136, 1003520) == (308, 504)  # only rounded to multiples of 28
    assert qwen2vl_resized_size(20, 30, 3136, 1003520) == (56, 84)  # scaled up to min_pixels


# ---- rewards ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, iou, giou_reward",
    [
        (_lisa("(100,200),(300,400)"), 1.0, 2.0),  # exact
        # intersection 100*200 = 20000, union 60000 -> 1/3; the enclosing box is the union -> GIoU 1/3
        (_lisa("(200,200),(400,400)"), 1 / 3, 1 + 1 / 3),
        # disjoint: union 40000 + 10000, enclosing 500*400 = 200000 -> GIoU -0.75, reward 0.25
        (_lisa("(500,500),(600,600)"), 0.0, 0.25),
        (_lisa("(300,400),(100,200)"), 0.0, 0.0),  # inverted: not a box
        (_lisa("(1500,1500),(2000,2000)"), 0.0, 0.0),  # outside the 0-1000 frame
        (_lisa("[100, 200, 300, 400]"), 0.0, 0.0),  # RefCOCO's form is not LISA's
        (_lisa("(100,200)"), 0.0, 0.0),  # malformed
        ("", 0.0, 0.0),  # empty
    ],
)
def test_lisa_rewards(completion, iou, giou_reward):
    plain = get_task("lisa").score(completion, _lisa_example())
    assert plain.components["iou"] == pytest.approx(iou)
    assert plain.total == pytest.approx(plain.components["format"] + iou)
    paper = get_task("lisa", reward="giou").score(completion, _lisa_example())
    assert paper.components["giou"] == pytest.approx(giou_reward)
    assert paper.total == pytest.approx(paper.components["format"] + giou_reward)


def test_format_reward_and_base_style_prefix():
    lisa = get_task("lisa")
    assert lisa.score(_lisa("(100,200),(300,400)"), _lisa_example()).components["format"] == 1.0
    assert lisa.score("(100,200),(300,400)", _lisa_example()).components == {"format": 0.0, "iou": 1.0}
    base = get_task("lisa", prompt_style="base")
    assert base.score("left</think><answer>(100,200),(300,400)</answer>", _lisa_example()).total == 2.0


def test_refcoco_answer_is_rescaled_from_the_resized_image():
    task = get_task("refcoco")
    task.configure_images(ImageBudget(3136, 100352, 28))  # the 500 x 300 image is fed at 392 x 224 (see the resize test)
    example = _refcoco_example()  # target [125, 75, 250, 150] in original pixels
    # [98, 56, 196, 112] on 392 x 224 is 98*500/392 = 125, 56*300/224 = 75, 250, 150 in the original
    answer = '<think>red shirt</think><answer>{"bbox_2d": [98, 56, 196, 112], "label": "man"}</answer>'
    assert task.score(answer, example).components == {"format": 1.0, "iou": pytest.approx(1.0)}
    # With a larger pixel budget the image is fed at 504 x 308, so the same answer means a different box.
    task.configure_images(ImageBudget(3136, 1003520, 28))
    mapped_back = (98 * 500 / 504, 56 * 300 / 308, 196 * 500 / 504, 112 * 300 / 308)  # (97.2, 54.5, 194.4, 109.1)
    expected = box_iou(mapped_back, (125, 75, 250, 150))
    assert expected < 0.6 and task.score(answer, example).components["iou"] == pytest.approx(expected)


def test_refcoco_degenerate_answers_score_zero():
    task = get_task("refcoco", reward="giou")
    for answer in ("[250, 150, 125, 75]", "[600, 400, 900, 500]", "[1, 2, 3]", "no box", "[nan, 1, 2, 3]"):
        reward = task.score(f"<think>x</think><answer>{answer}</answer>", _refcoco_example())
        assert reward.components["iou"] == 0.0 and reward.components["giou"] == 0.0, answer


ADVERSARIAL = [
    "(" * 100_000,
    "[" + "1, " * 50_000 + "]",
    "<think>" + "(1,1)," * 20_000 + "</think><answer>" + " " * 50_000 + "</answer>",
    "<answer>" * 5_000 + "(1,2),(3,4)" + "</answer>" * 5_000,
    "<think><think>(1,2),(3,4)</think></think><answer><answer>[1, 2, 3, 4]</answer></answer>",
    "<think>☃ 数学 𝔸</think><answer>(１００,２００),(３００,４００)</answer>",  # full-width digits
    "\x00\ud800<answer>(" + "9" * 400 + ",1),(2,3)</answer>",
]


@pytest.mark.parametrize("name", ["lisa", "refcoco"])
def test_adversarial_completions_never_raise(name):
    task = get_task(name, reward="giou")
    example = _lisa_example() if name == "lisa" else _refcoco_example()
    for completion in ADVERSARIAL:
        start = time.monotonic()
        reward = task.score(completion, example)
        assert 0.0 <= reward.total <= 3.0 and 0.0 <= reward.components["iou"] <= 1.0
        assert time.monotonic() - start < 1.0


def test_thousand_scores_take_a_few_seconds():
    lisa, refcoco = get_task("lisa"), get_task("refcoco")
    completions = [_lisa("(100,200),(300,400)"), _lisa("(200,200),(400,400)"), "", "<answer>[98, 56, 196]</answer>"]
    lisa_example, refcoco_example = _lisa_example(), _refcoco_example()
    start = time.monotonic()
    for i in range(500):
        lisa.score(completions[i % 4], lisa_example)
        refcoco.score(completions[i % 4], refcoco_example)
    assert time.monotonic() - start < 3.0


# ---- metrics ------------------------------------------------------------------------------------


def test_metrics_by_hand():
    completions = [
        _lisa("(100,200),(300,400)"),  # IoU 1
        _lisa("(200,200),(400,400)"),  # IoU 1/3
        "I cannot find it",  # failure: 0
        _lisa("(100,200),(300,340)"),  # 200*140 / 40000 = 0.7
    ]
    metrics = get_task("lisa").metrics([_lisa_example()] * 4, completions)
    assert metrics == {"mIoU": pytest.approx((1 + 1 / 3 + 0 + 0.7) / 4), "acc@0.5": 0.5}
    assert get_task("refcoco").metrics([], []) == {"mIoU": 0.0, "acc@0.5": 0.0}


def test_parse_answer_and_record_fields_carry_no_images():
    task = get_task("lisa")
    assert task.parse_answer(_lisa("(10, 20), (30.5, 40)")) == "10,20,30.5,40"
    assert task.parse_answer("nothing") is None
    fields = get_task("refcoco").record_fields(_refcoco_example())
    assert fields == {"id": "0", "problem": "man in red", "width": 500, "height": 300, "box": [125, 75, 250, 150]}


# ---- loaders ------------------------------------------------------------------------------------


def _write_image(path, size=(400, 200)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, "white").save(path)


def test_loads_visual_rft_box_json_with_relative_paths(tmp_path):
    _write_image(tmp_path / "reason_seg" / "test" / "a.jpg", (400, 200))
    rows = [
        {
            "image_path": "reason_seg/test/a.jpg",
            "instruction": ["what holds the food?", "the plate"],
            "boxes": [[40, 20, 200, 100], [0, 0, 1, 1]],
        }
    ]
    path = tmp_path / "lisa_test.json"
    path.write_text(json.dumps(rows))
    lisa = get_task("lisa")
    (example,) = lisa.load(str(path), split="test")  # evaluation: first instruction, first box
    assert example["instruction"] == "what holds the food?"
    assert example["box"] == pytest.approx([100, 100, 500, 500])  # 40/400*1000, 20/200*1000, ...
    assert message_images(lisa.messages(example))[0].size == (400, 200)
    assert [e["instruction"] for e in lisa.load(str(path), split="train")] == ["what holds the food?", "the plate"]


def test_loads_visual_rft_sft_conversations(tmp_path):
    _write_image(tmp_path / "imgs" / "b.jpg")
    user = "<img>imgs/b.jpg</img>\n Output the bounding box in the image corresponding to the instruction: where?"
    row = {
        "id": "lisa_0",
        "conversations": [{"from": "user", "value": user}, {"from": "assistant", "value": "(100,200),(300,400)"}],
    }
    path = tmp_path / "lisa_train_sft.json"
    path.write_text(json.dumps([row]))
    (example,) = get_task("lisa").load(str(path), split="train")
    assert example["id"] == "lisa_0" and example["instruction"] == "where?"
    assert example["box"] == [100, 200, 300, 400]


def test_loads_vlm_r1_json_jsonl_and_parquet(tmp_path):
    _write_image(tmp_path / "coco" / "train2014" / "c.jpg", (640, 480))
    problem = "Please provide the bounding box coordinate of the region this sentence describes: left dog."
    (tmp_path / "rec").mkdir()
    json_file = tmp_path / "rec" / "refcoco_val.json"
    row = {"image": "train2014/c.jpg", "problem": problem, "solution": [1, 2, 300, 400], "normal_caption": "left dog"}
    json_file.write_text(json.dumps([row]))
    refcoco = get_task("refcoco", image_root=str(tmp_path / "coco"))
    (example,) = refcoco.load(str(json_file), split="test")
    assert example["problem"] == problem and example["box"] == [1, 2, 300, 400]
    assert refcoco.original_size(example) == (640, 480)  # read lazily from the file header

    jsonl_file = tmp_path / "rec" / "refcoco_train.jsonl"
    conversation = [{"from": "human", "value": "<image>" + problem}, {"from": "gpt", "value": "[1, 2, 300, 400]"}]
    jsonl_file.write_text(json.dumps({"id": 7, "image": "train2014/c.jpg", "conversations": conversation}) + "\n")
    (example,) = refcoco.load(str(jsonl_file), split="train")
    assert example["id"] == "7" and example["problem"] == problem and example["box"] == [1, 2, 300, 400]

    import pandas as pd

    parquet = tmp_path / "refcoco.parquet"
    row = {"image": {"bytes": _png((64, 32)), "path": None}, "problem": problem, "solution": "[1, 2, 30, 20]"}
    pd.DataFrame([row]).to_parquet(parquet)
    (example,) = get_task("refcoco").load(str(parquet), split="test")
    assert get_task("refcoco").original_size(example) == (64, 32) and example["box"] == [1, 2, 30, 20]


def test_loader_errors_name_file_row_and_resolved_path(tmp_path):
    path = tmp_path / "lisa_val.json"
    path.write_text(json.dumps([{"image_path": "missing/x.jpg", "instruction": ["a"], "boxes": [[0, 0, 1, 1]]}]))
    with pytest.raises(DataError, match=str(tmp_path / "missing" / "x.jpg")):
        get_task("lisa").load(str(path), split="test")
    path.write_text(json.dumps([{"image": "x.jpg", "problem": "p"}]))
    with pytest.raises(DataError, match=r"lisa_val\.json: row 0: missing"):
        get_task("lisa").load(str(path), split="test")
    _write_image(tmp_path / "x.jpg")
    path.write_text(json.dumps([{"image": "x.jpg", "problem": "p", "solution": [5, 5, 1, 1]}]))
    with pytest.raises(DataError, match=r"row 0: ground-truth box"):
        get_task("refcoco").load(str(path), split="test")
    with pytest.raises(DataError, match="no public hub copy"):
        get_task("refcoco").load(None, split="test")


# ---- the synthetic twin -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lisa", "refcoco"])
def test_synthetic_twin_is_deterministic_and_its_boxes_verify(name):
    task = get_task(name)
    examples = task.load("synthetic:20", split="test")
    assert examples == task.load("synthetic:20", split="test")
    assert examples != task.load("synthetic:20", split="train")
    for example in examples:
        image = message_images(task.messages(example))[0]
        assert image.size == (example["width"], example["height"])
        text = example.get("instruction") or example["problem"]
        color = next(c for c in COLOURS if f"the {c} " in text)
        w, h = example["width"], example["height"]
        if name == "lisa":
            x1, y1, x2, y2 = (v / 1000 * s for v, s in zip(example["box"], (w, h, w, h)))
            answer = "({:.0f},{:.0f}),({:.0f},{:.0f})".format(*example["box"])
        else:
            x1, y1, x2, y2 = example["box"]
            seen_w, seen_h = task.image_budget.resized_size(w, h)
            sx, sy = seen_w / w, seen_h / h  # the model answers in pixels of the image it was fed
            answer = f"[{x1 * sx:.0f}, {y1 * sy:.0f}, {x2 * sx:.0f}, {y2 * sy:.0f}]"
        # A point inside every shape (a triangle's centroid lies at 2/3 of its height) has the named colour.
        assert image.getpixel((round((x1 + x2) / 2), round(y1 + (y2 - y1) * 2 / 3))) == COLOURS[color]
        assert task.score(f"<think>found it</think><answer>{answer}</answer>", example).components["iou"] > 0.9


@pytest.mark.parametrize("name", ["lisa", "refcoco"])
def test_easy_twin_is_one_corner_square_of_two_sizes_true_of_the_pixels(name):
    """synthetic_easy: the target alone, in the top-left corner, one of two nested boxes; its pixels are the box."""
    import numpy as np

    task = get_task(name, synthetic_easy=True)
    examples = task.load("synthetic:40", split="train")
    thousandths = set()
    for example in examples:
        image = np.asarray(message_images(task.messages(example))[0])
        text = example.get("instruction") or example["problem"]
        colour = next(c for c in COLOURS if f"the {c} square" in text)
        ys, xs = np.nonzero((image == COLOURS[colour]).all(axis=-1))
        w, h = example["width"], example["height"]
        assert w == h and (image == COLOURS[colour]).all(axis=-1).sum() + (image == (240, 240, 240)).all(axis=-1).sum() == w * h
        box = example["box"] if name == "refcoco" else [v / 1000 * w for v in example["box"]]
        assert abs(xs.min() - box[0]) <= 1 and abs(xs.max() + 1 - box[2]) <= 1.5 and abs(ys.min() - box[1]) <= 1
        thousandths.add(tuple(round(v / w * 1000 / 12.5) * 12.5 for v in box))  # to the nearest 12.5
        assert task.score(f"<think>x</think><answer>{task.reference_answer(example)}</answer>", example).components["iou"] > 0.9
    assert thousandths == {(0, 0, 250, 250), (0, 0, 750, 750)}


# ---- each family's coordinate frame, with its real processor ----------------------------------------------


@pytest.fixture(scope="module")
def family_processors(tmp_path_factory):
    """The processor of each tiny family as `load_processor` reads it from a saved folder (factor, model_type)."""
    from gpg_vl.processor import load_processor
    from gpg_vl.tiny import ARCHES, make_tiny

    root = tmp_path_factory.mktemp("families")
    return {arch: load_processor(make_tiny(root / arch, arch=arch)) for arch in ARCHES}


def test_each_family_budget_has_its_grid_factor_and_native_frame(family_processors):
    budgets = {arch: p.budget for arch, p in family_processors.items()}
    assert {a: (b.factor, b.native_box_frame) for a, b in budgets.items()} == {
        "qwen2_vl": (28, "thousandths"), "qwen2_5_vl": (28, "resized_pixels"), "qwen3_vl": (32, "thousandths"),
    }  # fmt: skip
    # the tiny kit's 56x56..112x112 budget: a 100x100 image is fed at 112x112 on 28 px, at 96x96 on 32 px
    assert budgets["qwen2_vl"].resized_size(100, 100) == (112, 112)
    assert budgets["qwen3_vl"].resized_size(100, 100) == (96, 96)


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("name", ["lisa", "refcoco"])
def test_auto_frame_reference_scores_one_and_the_wrong_frame_scores_the_ratio(family_processors, arch, name):
    """With box_frame=auto, the reference answer written in the family's own frame scores IoU 1.0 on the
    grounding twin; the same numbers read in the other frame score the IoU the two frames' sizes imply."""
    budget = family_processors[arch].budget
    task = registry_get_task(name, box_frame="auto")
    task.configure_images(budget)
    native = budget.native_box_frame
    assert task.answer_frame() == native
    for example in task.load("synthetic:6", split="test"):
        truth_size = task.truth_frame_size(example)
        exact = rescale_box(tuple(example["box"]), truth_size, task.answer_frame_size(example))  # the native frame
        reference = ("({:.3f},{:.3f}),({:.3f},{:.3f})" if name == "lisa" else "[{:.3f}, {:.3f}, {:.3f}, {:.3f}]").format(*exact)
        assert task.score(f"<think>x</think><answer>{reference}</answer>", example).components["iou"] == pytest.approx(1.0, abs=1e-4)
        rounded = task.reference_answer(example)  # whole numbers, as the warm-up writes them: close on a 112 px image
        assert task.score(f"<think>x</think><answer>{rounded}</answer>", example).components["iou"] > 0.85, rounded

        wrong = registry_get_task(name, box_frame="resized_pixels" if native == "thousandths" else "thousandths")
        wrong.configure_images(budget)
        raw = wrong.parse_box(f"<answer>{reference}</answer>")
        # read in the wrong frame, the box is scaled by (wrong frame size / right frame size) on each axis
        w, h = task.original_size(example)
        seen_w, seen_h = budget.resized_size(w, h)
        right_size, wrong_size = ((1000, 1000), (seen_w, seen_h)) if native == "thousandths" else ((seen_w, seen_h), (1000, 1000))
        implied = tuple(v * truth_size[i % 2] / wrong_size[i % 2] for i, v in enumerate(raw))
        truth_in_right = tuple(v * truth_size[i % 2] / right_size[i % 2] for i, v in enumerate(raw))
        expected = box_iou(clip_box(implied, *truth_size), truth_in_right) if clip_box(implied, *truth_size) else 0.0
        got = wrong.score(f"<answer>{reference}</answer>", example).components["iou"]
        assert got == pytest.approx(expected, abs=1e-9) and got < 0.5, (got, expected)


def test_refcoco_box_maps_back_on_a_factor_32_processor(family_processors):
    """Issue 25: a Qwen3-VL processor resizes on 32, so a 100x100 image is fed at 96x96, not Qwen2-VL's
    112x112. A RefCOCO answer in resized pixels maps back through 96: [24, 24, 72, 72] is [25, 25, 75, 75]."""
    task = registry_get_task("refcoco")  # resized_pixels, as VLM-R1
    task.configure_images(family_processors["qwen3_vl"].budget)
    example = {"id": "0", "image": None, "width": 100, "height": 100, "box": [25, 25, 75, 75]}
    assert task.predicted_box("<answer>[24, 24, 72, 72]</answer>", example) == pytest.approx((25, 25, 75, 75))
    assert task.reference_answer(example) == "[24, 24, 72, 72]"
    task.configure_images(family_processors["qwen2_vl"].budget)  # on 28 the same numbers are another box
    assert task.predicted_box("<answer>[24, 24, 72, 72]</answer>", example) == pytest.approx((24 * 100 / 112, 24 * 100 / 112, 72 * 100 / 112, 72 * 100 / 112))


def test_box_frame_option_is_checked_and_auto_needs_a_known_family():
    with pytest.raises(ValueError, match=r"box_frame must be one of \('thousandths', 'resized_pixels', 'auto'\), got 'pixels'"):
        registry_get_task("lisa", box_frame="pixels")
    task = registry_get_task("refcoco", box_frame="auto")
    task.configure_images(ImageBudget(3136, 12544, 28))  # a model whose family is not known
    with pytest.raises(ValueError, match="box_frame=auto needs a model of a known family"):
        task.answer_frame()
    assert registry_get_task("lisa").box_frame == "thousandths" and registry_get_task("refcoco").box_frame == "resized_pixels"
