"""The rollout inspector and what the trainer logs for it.

Invariants: a real training run logs, per group, `valid` = "rewards not all equal", the advantages the
algorithm computes from the logged rewards, and per completion tokens that spell its text with one sampled
log-prob each; the old keys (`prompt`, `completions`, `rewards`) stay. The inspector escapes every logged
string, colours low-probability tokens red and likely ones green, shows old files without the new fields,
lets a resumed run's re-logged step replace the earlier one, and never reads an image outside the run.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from gpg_vl_demo import inspector

TASK = f"{Path(__file__).parent / 'scripted_task.py'}:ScriptedTask"
HOSTILE = '<script>alert("x")</script>'


# ---- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A real 2-step run of the tiny model that logs every group of every step."""
    from gpg_vl.cli import main
    from gpg_vl.tiny import make_tiny

    root = tmp_path_factory.mktemp("inspect")
    model = make_tiny(root / "tiny", seed=0)
    out = root / "run"
    args = [
        "train", f"task.name={TASK}", f"model.name_or_path={model}", "model.min_pixels=3136", "model.max_pixels=3136",
        "task.train_data=synthetic:32", "task.options={image_size: 56}", "rollout.group_size=4",
        "rollout.max_new_tokens=6", "train.prompts_per_step=4", "train.max_steps=2", f"train.output_dir={out}",
        "eval.at_end=false", "logging.progress_bar=false", "logging.tensorboard=false", "logging.sample_every=1",
        "logging.num_samples=4", "checkpoint.save_every=0",
    ]
    assert main(args) == 0
    return out, model


def new_row(step: int, **changes) -> dict:
    """One samples.jsonl line in the current schema: a valid group of G=2."""
    row = {
        "step": step, "prompt": "Which colour? <b>bold</b>", "image": f"samples/step-{step:06d}-0.png",
        "completions": ["<answer>A</answer>", HOSTILE], "rewards": [2.0, 0.0],
        "components": [{"format": 1.0, "accuracy": 1.0}, {"format": 0.0, "accuracy": 0.0}],
        "valid": True, "finish_reasons": ["stop", "length"], "advantages": [1.0, -1.0],
        "tokens": [["<answer>", "A", "</answer>", "<|im_end|>"], ['<script>alert("x")', "</script>"]],
        "logprobs": [[-0.01, -3.0, -0.02, -0.05], [-0.7, -4.5]],
    }
    row.update(changes)
    return row


def write_run(folder: Path, rows: list[dict], tail: str = "") -> Path:
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    for row in rows:
        if isinstance(row.get("image"), str) and row["image"].startswith("samples/"):
            Image.new("RGB", (56, 56), (30, 160, 40)).save(folder / row["image"])
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return folder


# ---- what the trainer logs -----------------------------------------------------------------------


def test_trainer_logs_tokens_logprobs_advantages_and_validity(trained_run):
    from gpg_vl import algorithms
    from gpg_vl.config import Config
    from gpg_vl.modeling import load_processor

    out, model = trained_run
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in rows}) == [1, 2] and len(rows) == 8  # 4 groups a step
    tokenizer = load_processor(model).tokenizer
    special = set(tokenizer.all_special_tokens)
    std_normalize = Config().algorithm.std_normalize
    for row in rows:
        assert {"prompt", "completions", "rewards", "image"} <= set(row)  # old readers keep working
        assert row["valid"] == (len(set(row["rewards"])) > 1)
        expected = algorithms.compute_advantages("gpg", torch.tensor(row["rewards"]), group_size=4, std_normalize=std_normalize)
        assert row["advantages"] == pytest.approx(expected.tolist(), abs=1e-6)
        assert [c["scripted"] for c in row["components"]] == row["rewards"]
        for text, tokens, logprobs, finish in zip(row["completions"], row["tokens"], row["logprobs"], row["finish_reasons"]):
            assert len(tokens) == len(logprobs) >= 1
            assert all(math.isfinite(v) and v <= 0 for v in logprobs)
            assert "".join(t for t in tokens if t not in special) == text  # the tokens spell the completion
            assert (finish == "stop") == (tokens[-1] in special)  # a stopped completion ends in its EOS
    # the inspector reads the real file: every group, every completion coloured token by token
    page = inspector.step_html(out, 2)
    assert page.count('class="gpg-group"') == 4
    assert page.count('class="gpg-tok"') == sum(len(t) for r in rows if r["step"] == 2 for t in r["tokens"]) + 5  # + legend
    assert "data:image/png;base64," in page


# ---- reading and showing samples.jsonl ------------------------------------------------------------


def test_step_html_escapes_untrusted_text_and_colours_by_probability(tmp_path):
    run = write_run(tmp_path, [new_row(3)])
    page = inspector.step_html(run, 3)
    assert "<script" not in page and "<b>bold" not in page  # prompt, tokens and text are all escaped
    assert "&lt;script&gt;alert(&quot;x&quot;)" in page and "&lt;b&gt;bold&lt;/b&gt;" in page
    # p = exp(-0.01) ~ 0.99 -> hue 119 (green); p = exp(-3) ~ 0.05 -> hue 6 (red)
    assert 'background:hsl(119, 75%, 80%)" title="log-prob -0.010, p 0.990">&lt;answer&gt;' in page
    assert 'background:hsl(6, 75%, 80%)" title="log-prob -3.000, p 0.050">A<' in page
    assert "valid: rewards differ" in page and "+1.000" in page and "-1.000" in page
    assert "format 1, accuracy 1" in page and "format 0, accuracy 0" in page
    assert "hit max tokens" in page  # the second completion's finish reason


def test_old_files_without_new_fields_are_shown(tmp_path):
    old = {"step": 10, "prompt": "Q", "completions": ["x", "y"], "rewards": [1.0, 1.0], "image": "samples/step-000010-0.png"}
    page = inspector.step_html(write_run(tmp_path, [old]), 10)
    assert "predates per-token logging" in page and page.count('class="gpg-tok"') == 5  # only the legend's
    assert "not valid (from rewards; flag not logged)" in page  # equal rewards: derived, and said so
    assert page.count("&ndash;") >= 4  # no components and no advantage for either completion


def test_partial_lines_resumed_steps_and_bad_rows(tmp_path):
    rows = [new_row(5), new_row(5, prompt="first try"), new_row(6), {"step": 6, "completions": "not a list"},
            new_row(5, prompt="after resume")]
    run = write_run(tmp_path, rows, tail='{"step": 7, "prompt": "still being wri')
    assert inspector.logged_steps(run) == [5, 6]  # the half-written step 7 is not offered yet
    assert [g.prompt for g in inspector.read_step(run, 5)] == ["after resume"]  # the re-logged block wins
    assert len(inspector.read_step(run, 6)) == 1  # the malformed row is skipped
    assert inspector.read_step(run, 9) == [] and "No samples logged at step 9" in inspector.step_html(run, 9)
    assert inspector.logged_steps(tmp_path / "nowhere") == []


def test_mismatched_token_lists_fall_back_to_text(tmp_path):
    row = new_row(1, tokens=[["a", "b"], ["c"]], logprobs=[[-0.1], [-0.2]])  # first completion: 2 tokens, 1 log-prob
    group = inspector.read_step(write_run(tmp_path, [row]), 1)[0]
    assert group.completions[0].tokens is None and group.completions[1].tokens == ["c"]


def test_images_outside_the_run_are_never_read(tmp_path):
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(secret)
    run = tmp_path / "run"
    write_run(run, [new_row(1, image="../secret.png"), new_row(2, image=str(secret))])
    assert inspector.group_image(run, "../secret.png") is None and inspector.group_image(run, str(secret)) is None
    assert "no image logged" in inspector.step_html(run, 1)
    assert inspector.group_image(run, "samples/nothing.png") is None


def test_backend_inspector_view_needs_no_checkpoint(tmp_path):
    from gpg_vl_demo.backend import DemoBackend

    run = write_run(tmp_path / "myrun", [new_row(4)])
    (run / "metrics.jsonl").write_text(json.dumps({"step": 4, "reward_mean": 1.0, "valid_fraction": 0.5, "alpha": 2.0}) + "\n")
    backend = DemoBackend([], [str(run)], task="shapes", data="synthetic:2", split="test")
    steps, info = backend.inspector_steps("myrun")
    assert steps == [4] and "1 step(s)" in info
    line, page = backend.inspector_view("myrun", 4)
    assert re.search(r"`valid_fraction` 0\.5, `alpha` 2", line) and "gpg-group" in page
    assert backend.inspector_view("../etc", 4)[1] == ""  # only --run folders are offered
    assert not backend.cache._loaded  # nothing was loaded


# ---- several images, and the boxes of a grounding task ----------------------------------------------


def test_a_two_image_run_logs_and_shows_both_images(tmp_path):
    """A real step on the two-image twin: samples.jsonl names both images, both files exist, and the
    inspector shows both, in order."""
    from gpg_vl.cli import main
    from gpg_vl.tiny import make_tiny

    model = make_tiny(tmp_path / "tiny", seed=0)
    out = tmp_path / "run"
    args = ["train", "task.name=gpg_vl_tasks.morecount:MoreCountTask", f"model.name_or_path={model}",
            "model.min_pixels=3136", "model.max_pixels=3136", "task.train_data=synthetic:8", "rollout.group_size=2",
            "rollout.max_new_tokens=4", "train.prompts_per_step=2", "train.max_steps=1", f"train.output_dir={out}",
            "eval.at_end=false", "logging.progress_bar=false", "logging.tensorboard=false", "logging.sample_every=1",
            "logging.num_samples=2", "checkpoint.save_every=0"]  # fmt: skip
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert rows and all(r["images"] == [r["image"], r["image"].replace(".png", "-1.png")] for r in rows)
    assert all((out / p).is_file() for r in rows for p in r["images"])
    (group,) = inspector.read_step(out, 1)[:1]
    assert len(group.images) == 2
    page = inspector.step_html(out, 1)
    assert page.count('alt="prompt image 1"') == len(rows) and page.count('alt="prompt image 2"') == len(rows)


def test_grounding_boxes_are_logged_in_original_pixels():
    """The true box and each completion's box, as the reward read them, in pixels of the original image."""
    from gpg_vl.boxes import grounding_boxes
    from gpg_vl.registry import get_task

    lisa = get_task("lisa")  # boxes on 0-1000 of a 200x100 image
    example = {"id": "0", "box": [100, 200, 500, 600], "width": 200, "height": 100}
    logged = grounding_boxes(lisa, example, ["<answer>(0,0),(500,1000)</answer>", "no box"], (200, 100))
    assert logged == {"truth_box": [20.0, 20.0, 100.0, 60.0], "boxes": [[0.0, 0.0, 100.0, 100.0], None]}
    assert grounding_boxes(get_task("shapes"), {"answer": "(A)"}, ["(A)"], (56, 56)) == {}


def test_inspector_draws_each_completion_box_beside_the_truth_with_its_iou(tmp_path):
    row = new_row(3, truth_box=[10, 10, 40, 40], boxes=[[10, 10, 40, 40], None],
                  components=[{"format": 1.0, "iou": 1.0}, {"format": 0.0, "iou": 0.0}])  # fmt: skip
    write_run(tmp_path, [row])
    (group,) = inspector.read_step(tmp_path, 3)
    assert group.truth_box == [10, 10, 40, 40] and [c.box for c in group.completions] == [[10, 10, 40, 40], None]
    page = inspector.step_html(tmp_path, 3)
    assert 'alt="box with IoU 1.00"' in page and "no box (IoU 0.00)" in page
    # the drawing itself: green truth and the red answer on the prompt image
    drawn = inspector.draw_boxes(Image.new("RGB", (56, 56), (30, 160, 40)), [("IoU 1.00", (10, 10, 40, 40))], (10, 10, 40, 40))
    colours = {c for _, c in drawn.getcolors(1 << 20)}
    assert (220, 30, 30) in colours
    bad = new_row(4, truth_box=[1, 2, "x", 4], boxes=["junk", [1, 2, 3]])  # malformed boxes are dropped, not drawn
    write_run(tmp_path, [bad])
    (group,) = inspector.read_step(tmp_path, 4)
    assert group.truth_box is None and [c.box for c in group.completions] == [None, None]
    assert "gpg-boxes" not in inspector.step_html(tmp_path, 4)
