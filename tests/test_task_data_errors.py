"""Bad data gives one line naming the file and row (a DataError the CLI prints), never a traceback."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from gpg_vl import get_task
from gpg_vl.data import DataError, read_records, to_pil

# One row per task in its own schema, naming the image file "img.png".
ROWS = {
    "geometry": {"image_path": "img.png", "question": "What is x?", "ground_truth": "1"},
    "cvbench": {"filename": "img.png", "question": "Which?", "choices": ["a", "b"], "answer": "(A)"},
    "classification": {"image": "img.png", "solution": "<answer>rose</answer>"},
    "lisa": {"image_path": "img.png", "instruction": "the thing", "boxes": [[0, 0, 5, 5]]},
    "refcoco": {"image": "img.png", "problem": "the thing", "solution": [0, 0, 5, 5]},
}


def _write_rows(folder, rows: list[dict]) -> str:
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def test_jsonl_that_is_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    good = json.dumps(ROWS["geometry"]).encode()
    path.write_bytes(good + b"\n" + good + b"\n" + good.replace(b"What", b"Wh\xe9t") + b"\n")  # Latin-1 on line 3
    with pytest.raises(DataError) as error:
        read_records(str(path))
    message = str(error.value)
    assert message.startswith(f"{path}:3: not UTF-8 text (byte 0xe9") and "\n" not in message
    with pytest.raises(DataError, match=r"rows\.jsonl:3: not UTF-8"):
        get_task("geometry").load(str(path), "test")


@pytest.mark.parametrize("name", sorted(ROWS))
def test_extreme_aspect_ratio_names_file_and_row(tmp_path, name):
    Image.new("RGB", (20, 20), (9, 9, 9)).save(tmp_path / "ok.png")
    Image.new("RGB", (50_000, 10), (9, 9, 9)).save(tmp_path / "img.png")
    ok = {k: ("ok.png" if v == "img.png" else v) for k, v in ROWS[name].items()}
    path = _write_rows(tmp_path, [ok, ROWS[name]])
    task = get_task(name)
    examples = task.load(path, "test")
    task.messages(examples[0])  # the square image is fine
    with pytest.raises(DataError) as error:
        task.messages(examples[1])
    message = str(error.value)
    assert message.startswith(path) and "row 1" in message and "50000x10" in message and "\n" not in message


def test_to_pil_checks_the_shape_before_decoding():
    tall = Image.new("RGB", (3, 700))
    with pytest.raises(DataError, match=r"^upload: image is 3x700; Qwen2-VL takes images at most 200 times"):
        to_pil(tall, where="upload")
    assert to_pil(Image.new("RGB", (1, 200))).size == (1, 200)  # exactly 200:1 is still accepted
