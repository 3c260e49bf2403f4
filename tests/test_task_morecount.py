"""The two-image twin `morecount` end to end: its task contract, both images through the HF rollout and the
shared-prefix training forward (equal to the per-row forward), `gpg-vl eval` with controls that blank or swap
both images, and the `generic` task reading a list image column."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from gpg_vl.cli import main
from gpg_vl.controls import BLIND_GREY, ControlledTask, donor_indices
from gpg_vl.images import message_images
from gpg_vl.registry import get_task

TASK = "gpg_vl_tasks.morecount:MoreCountTask"
RIGHT = "<think>count</think><answer>{}</answer>"


def test_every_prompt_shows_two_images_with_different_counts():
    task = get_task(TASK)
    examples = task.load("synthetic:40", "test")
    assert examples == task.load("synthetic:40", "test")  # deterministic: PIL images compare by pixels
    assert [e["counts"] for e in examples] != [e["counts"] for e in task.load("synthetic:40", "train")]
    for example in examples:
        images = message_images(task.messages(example))
        assert len(images) == 2 and all(im.size == (56, 56) for im in images)
        a, b = example["counts"]
        assert a != b and example["answer"] == ("(A)" if a > b else "(B)")
    answers = [e["answer"] for e in examples]
    assert 0.3 < answers.count("(A)") / len(answers) < 0.7  # chance is a half
    text = task.messages(examples[0])[0]["content"][2]["text"]
    assert text.startswith("Which image shows more shapes?\n(A) the first image\n(B) the second image\n")


def test_colour_question_shows_red_in_exactly_one_image_and_the_answer_names_it():
    from gpg_vl_tasks._synthetic import COLOURS

    task = get_task(TASK, question="colour")
    examples = task.load("synthetic:40", "test")
    for example in examples:
        images = message_images(task.messages(example))
        has_red = [any(colour == COLOURS["red"] for _, colour in im.getcolors()) for im in images]
        assert len(images) == 2 and has_red.count(True) == 1  # read from the pixels, not from the example's fields
        assert example["answer"] == ("(A)" if has_red[0] else "(B)")
    answers = [e["answer"] for e in examples]
    assert 0.3 < answers.count("(A)") / len(answers) < 0.7
    assert task.messages(examples[0])[0]["content"][2]["text"].startswith("Which image shows a red shape?\n(A) the first")
    with pytest.raises(ValueError, match="question must be one of count, colour"):
        get_task(TASK, question="size")


def test_scores_right_wrong_malformed_and_empty():
    task = get_task(TASK)
    example = next(e for e in task.load("synthetic:10", "test") if e["answer"] == "(B)")
    assert task.score(RIGHT.format("(B)"), example).components == {"format": 1.0, "accuracy": 1.0}
    assert task.score(RIGHT.format("the second image"), example).components["accuracy"] == 1.0
    assert task.score(RIGHT.format("(A)"), example).components == {"format": 1.0, "accuracy": 0.0}
    assert task.score("(B)", example).components == {"format": 0.0, "accuracy": 0.0}  # no <answer>
    assert task.score("", example).total == 0.0
    with pytest.raises(ValueError, match="max_shapes must be in"):
        get_task(TASK, max_shapes=9)


def test_controls_blank_both_images_and_swap_both():
    task = get_task(TASK)
    examples = task.load("synthetic:5", "test")
    blind = message_images(ControlledTask(task, "blind", examples).messages(examples[0]))
    assert len(blind) == 2 and all(im.getcolors() == [(56 * 56, BLIND_GREY)] for im in blind)
    shuffled = ControlledTask(task, "shuffled", examples)
    donor = donor_indices(5)
    for i, example in enumerate(examples):
        got = [im.tobytes() for im in message_images(shuffled.messages(example))]
        assert got == [im.tobytes() for im in examples[donor[i]]["images"]]  # both of another example's images


def test_hf_rollout_and_shared_prefix_forward_on_two_image_prompts(tiny_model_dir):
    """Sampled completions of two-image prompts, replayed by the shared-prefix forward (each prompt and its two
    images once per group), give the per-row forward's log-probs."""
    from gpg_vl.config import ModelConfig
    from gpg_vl.modeling import load_policy
    from gpg_vl.prefix import compute_micro_batch_logprobs
    from gpg_vl.rollout import SamplingParams
    from gpg_vl.rollout.hf import HFEngine

    model, processor = load_policy(ModelConfig(name_or_path=str(tiny_model_dir), min_pixels=3136, max_pixels=12544))
    task = get_task(TASK)
    prompts = [task.messages(e) for e in task.load("synthetic:3", "train")]
    inputs = processor([processor.resize(p) for p in prompts])
    assert inputs["image_grid_thw"].shape[0] == 6  # two images per prompt reach the processor
    torch.manual_seed(0)
    rollout = HFEngine(model, processor).generate(prompts, SamplingParams(n=3, temperature=1.0, max_new_tokens=6, seed=0))
    assert rollout.prompt_indices == [0, 0, 0, 1, 1, 1, 2, 2, 2] and len(rollout.texts) == 9
    with torch.no_grad():
        args = (model, processor, prompts, rollout.prompt_indices, rollout.completion_ids, rollout.response_mask, 1.0)
        per_row = compute_micro_batch_logprobs(*args, shared=False)
        shared = compute_micro_batch_logprobs(*args, shared=True)
    torch.testing.assert_close(shared, per_row, rtol=1e-5, atol=1e-5)
    assert (per_row[rollout.response_mask == 0] == 0).all() and (per_row[rollout.response_mask == 1] < 0).all()


def test_eval_with_controls_on_two_image_prompts(tiny_model_dir, tmp_path):
    """`gpg-vl eval` of the two-image twin with the real HF engine: records show two images per prompt and the
    controls' records exist for every example."""
    args = ["eval", "--task", TASK, "--model", str(tiny_model_dir), "--data", "synthetic:4", "--output", str(tmp_path),
            "--max-new-tokens", "4", "--controls", "blind", "shuffled"]  # fmt: skip
    assert main(args) == 0
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    records = [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(r["prompt"].startswith("<image>\n<image>\nWhich image") for r in records)
    for control in ("blind", "shuffled"):
        assert len((folder / f"records.{control}.jsonl").read_text().splitlines()) == 4
    summary = json.loads((folder / "summary.json").read_text())
    assert {"accuracy", "blind/accuracy", "shuffled/accuracy", "visual_gain/accuracy"} <= summary.keys()
    assert summary["visual_gain/accuracy"] == pytest.approx(summary["accuracy"] - summary["blind/accuracy"])


def test_generic_task_reads_a_list_image_column(tmp_path):
    red, blue = Image.new("RGB", (40, 40), "red"), Image.new("RGB", (40, 40), "blue")
    red.save(tmp_path / "a.png")
    blue.save(tmp_path / "b.png")
    row = {"id": "r0", "image": ["a.png", "b.png"], "problem": "Which image is red?\n(A) first\n(B) second", "solution": "(A)"}
    (tmp_path / "data.jsonl").write_text(json.dumps(row) + "\n" + json.dumps({**row, "id": "r1", "image": ["b.png", "a.png"], "solution": "(B)"}) + "\n")
    task = get_task("generic", question_column="problem", answer_column="solution", rewards={"format": 0.5, "choice": 1.0})
    examples = task.load(str(tmp_path / "data.jsonl"), "test")
    images = message_images(task.messages(examples[0]))
    assert [im.getpixel((0, 0)) for im in images] == [(255, 0, 0), (0, 0, 255)]
    swapped = message_images(ControlledTask(task, "shuffled", examples).messages(examples[0]))
    assert [im.getpixel((0, 0)) for im in swapped] == [(0, 0, 255), (255, 0, 0)]  # both of the other row's
