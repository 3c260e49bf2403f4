"""GEOQA geometry task: prompts, rewards, the r1v/strict metrics, bounded grading off the main thread, loaders."""

from __future__ import annotations

import io
import json
import re
import threading
import time

import pytest
from PIL import Image

from gpg_vl import get_task, mathgrade, mathverify
from gpg_vl.data import DataError
from gpg_vl.images import message_images
from gpg_vl.mathgrade import grade_r1v, grade_strict, normalize_answer
from gpg_vl.parsing import extract_answer

QUESTION = (  # row 0 of R1-V's geoqa_test_prompts.jsonl
    "As shown in the figure, in triangle ABC, it is known that angle A = 80.0, angle B = 60.0, DE parallel  BC, "
    "then the size of angle CED is ()"
)


def _png(color=(200, 10, 10), size=(64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _example(truth="140°") -> dict:
    return {"id": "0", "image": _png(), "question": QUESTION, "ground_truth": truth}


def _answer(text: str) -> str:
    return f"<think>reasoning</think><answer>{text}</answer>"


# ---- prompts ------------------------------------------------------------------------------------


def test_instruct_prompt_golden():
    messages = get_task("geometry").messages(_example())
    assert [m["role"] for m in messages] == ["user"]
    image, text = messages[0]["content"]
    assert image["type"] == "image" and isinstance(image["image"], Image.Image) and image["image"].size == (64, 48)
    assert text == {
        "type": "text",
        "text": QUESTION + " Output the thinking process in <think> </think> and final answer (number) in "
        "<answer> </answer> tags.",
    }


def test_base_prompt_ends_in_think_and_scores_the_continuation():
    task = get_task("geometry", prompt_style="base")
    messages = task.messages(_example())
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[0]["content"].startswith("A conversation between User and Assistant.")
    assert messages[-1] == {"role": "assistant", "content": "<think>"}
    # The model continues after "<think>", so its text lacks the opening tag.
    assert task.score(" angles sum to 180</think><answer>140</answer>", _example()).components == {
        "format": 1.0,
        "accuracy": 1.0,
    }


def test_unknown_option_and_bad_values_fail():
    with pytest.raises(TypeError, match="unknown options"):
        get_task("geometry", colour="red")
    with pytest.raises(ValueError, match="prompt_style"):
        get_task("geometry", prompt_style="chat")


# ---- rewards ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, truth, fmt, acc",
    [
        (_answer("140°"), "140°", 1, 1),  # correct
        (_answer("140"), "140°", 1, 1),  # degree sign optional
        (_answer("3"), "3cm", 1, 1),  # units optional
        (_answer("2\\sqrt{3}"), "2√{3}", 1, 1),
        (_answer("\\sqrt{12}"), "2√{3}", 1, 1),
        (_answer("2.4"), "\\frac{12}{5}", 1, 1),
        (_answer("\\frac{24}{10}"), "\\frac{12}{5}", 1, 1),
        (_answer("∠CED = 140°"), "140°", 1, 1),
        (_answer("120°"), "140°", 1, 0),  # wrong
        (_answer("2"), "2√{3}", 1, 0),  # strict: 2 is not 2√3
        ("The answer is 140", "140°", 0, 0),  # malformed: no tags, no answer block
        ("<answer>140</answer>", "140°", 0, 1),  # no think block: format fails, the answer still counts
        ("", "140°", 0, 0),  # empty
    ],
)
def test_rewards(completion, truth, fmt, acc):
    reward = get_task("geometry").score(completion, _example(truth))
    assert reward.components == {"format": fmt, "accuracy": acc}
    assert reward.total == fmt + acc


def test_normalize_answer_reads_geoqa_ground_truths():
    assert normalize_answer("140°") == "140"
    assert normalize_answer("25πcm^{2}") == "25\\pi"
    assert normalize_answer("(√{3}+1)小时") == "(\\sqrt{3}+1)"
    assert normalize_answer("\\frac{1}{2}cm²") == "\\frac{1}{2}"
    assert normalize_answer("$\\boxed{2\\sqrt{3}}$") == "2\\sqrt{3}"


@pytest.mark.parametrize("text", ["answer" + " " * 990 + "x", "1" + " " * 998 + "x", "1" + "$" * 998 + "x"])
def test_normalize_answer_is_fast_on_whitespace_runs(text):
    # The unit pattern once had two `\s*` around an optional `\text{`: a 1000-char run of spaces took 10 s.
    normalize_answer.cache_clear()
    start = time.perf_counter()
    normalize_answer(text)
    assert time.perf_counter() - start < 0.5


ADVERSARIAL = [
    "x" * 100_000,
    "<think>" + "9" * 100_000 + "</think><answer>" + "(" * 50_000 + "</answer>",
    "<answer>" * 5_000 + "140" + "</answer>" * 5_000,
    "<think><think><answer>140</answer></think></think><answer><answer>140</answer></answer>",
    "<think>数学 ☃ 𝔸</think><answer>١٤٠°</answer>",
    "\x00\ud800<answer>\u202e140</answer>",
    _answer("9^{9^{9}}"),  # sympy would compute for minutes
    _answer("10^{10^{10}}!"),
    _answer("\\frac{" * 400 + "1" + "}{2}" * 400),
]


@pytest.mark.parametrize("completion", ADVERSARIAL)
def test_adversarial_completions_are_bounded(completion):
    task = get_task("geometry")
    start = time.monotonic()
    reward = task.score(completion, _example())
    assert 0.0 <= reward.total <= 2.0
    assert set(reward.components) == {"format", "accuracy"}
    assert time.monotonic() - start < 8.0  # one math-verify deadline (5 s) at most, plus a worker start


def test_thousand_scores_take_a_few_seconds():
    task = get_task("geometry")
    truths = ["140°", "3cm", "2√{3}", "\\frac{12}{5}", "65°"]
    answers = ["140", "3", "2\\sqrt{3}", "2.4", "70", "", "banana"]
    start = time.monotonic()
    for i in range(1000):
        task.score(_answer(answers[i % 7]), _example(truths[i % 5]))
    assert time.monotonic() - start < 5.0


# ---- metrics ------------------------------------------------------------------------------------


def test_r1v_and_strict_differ_as_documented():
    # The first three are graded differently by the two protocols (math-verify 0.9 behaviour):
    cases = [
        # r1v parses the bare ground truth "2√{3}" as 2 and the output's last anchored number 2: counted right.
        ("2√{3}", "<think>The side is 2√3.</think> <answer> 2 </answer>", True, False),
        # r1v: math-verify cannot anchor a number glued to a tag, so a right answer is missed.
        ("110°", "<think>so</think><answer>110</answer>", False, True),
        # r1v: the number found is 70 from the reasoning; the answer given is 80.
        ("70°", "<think>C is 70</think><answer>80</answer>", True, False),
        ("140°", "<think>180 - 40 = 140</think> <answer>140°</answer>", True, True),
    ]
    for truth, completion, r1v, strict in cases:
        assert grade_r1v(completion, truth) is r1v, completion
        assert grade_strict(extract_answer(completion), truth) is strict, completion
    examples = [_example(truth) for truth, *_ in cases]
    metrics = get_task("geometry").metrics(examples, [completion for _, completion, *_ in cases])
    assert metrics == {"r1v": 3 / 4, "strict": 2 / 4}


def test_metrics_of_nothing_and_misaligned_inputs():
    task = get_task("geometry")
    assert task.metrics([], []) == {"r1v": 0.0, "strict": 0.0}
    with pytest.raises(ValueError):
        task.metrics([_example()], [])


def test_scores_off_the_main_thread_equal_the_main_thread():
    # math-verify's own timeout is signal.alarm, which fails off the main thread; the worker must not care.
    task = get_task("geometry")
    truths = ["2√{3}", "\\frac{12}{5}", "(√{3}+1)小时", "140°", "25πcm^{2}"]
    completions = [_answer(a) for a in ("\\sqrt{12}", "12/5", "1+\\sqrt{3}", "139", "25\\pi")]
    completions.append("<think>C is 70</think> <answer> 140 </answer>")
    examples = [_example(truths[i % 5]) for i in range(len(completions))]
    mathgrade._verify.cache_clear()
    results = {}

    def run():
        results["scores"] = [task.score(c, ex).total for c, ex in zip(completions, examples)]
        results["metrics"] = task.metrics(examples, completions)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=60)
    mathgrade._verify.cache_clear()
    assert results["scores"] == [task.score(c, ex).total for c, ex in zip(completions, examples)]
    assert results["metrics"] == task.metrics(examples, completions)
    assert results["scores"] == [2.0, 2.0, 2.0, 1.0, 2.0, 1.0]


def test_a_hanging_verification_times_out_and_the_worker_recovers():
    # r1v hands the whole output to math-verify (no guard), and verifying 9^(9^9) against 3 never ends.
    start = time.monotonic()
    assert grade_r1v("<think>so</think> <answer> $9^{9^{9}}$ </answer>", "3", timeout_s=1.0) is False
    assert time.monotonic() - start < 6.0
    assert grade_r1v("<think>so</think> the answer is 3", "3", timeout_s=5.0) is True


# Distinct answers that each ran into the 5 s deadline before the pre-check (nothing is cached between them).
DEADLINE_HITTERS = [_answer("\\frac{" * (60 + k) + "1" + "}{2}" * (60 + k)) for k in range(4)] + [
    _answer("(" * k + "((9^{99})^{99})^{99})^{99}" + ")" * k) for k in range(4)
]


def test_deadline_hitting_answers_are_rejected_before_math_verify():
    # Training scores one completion at a time: N such answers used to cost N x 5 s per step.
    task = get_task("geometry")
    task.score(_answer("2\\sqrt{3}"), _example("2√{3}"))  # the worker's start-up is not what is measured
    mathgrade._verify.cache_clear()
    start = time.monotonic()
    rewards = [task.score(c, _example("140°")) for c in DEADLINE_HITTERS]
    assert time.monotonic() - start < 1.0  # before: 8 x 5 s
    assert [r.components["accuracy"] for r in rewards] == [0.0] * len(DEADLINE_HITTERS)
    for answer in (None, "x" * 2000, "1+" * 70 + "1", "{" * 7 + "1" + "}" * 7, "2^{2}^{2}^{2}", "5!"):
        assert mathgrade.strict_checkable(answer) is None, answer
    for answer in ("140°", "2\\sqrt{3}", "\\frac{25\\pi}{6}", "(\\sqrt{3}+1)小时", "2^{10}"):
        assert mathgrade.strict_checkable(answer) is not None, answer


def test_a_batch_of_hanging_r1v_outputs_is_bounded_by_the_budget():
    # r1v hands the whole output to math-verify, so no pre-check applies: the batch budget bounds it.
    n, timeout = 8, 1.0
    outputs = [f"<think>so</think> <answer> $9^{{9^{{{9 + k}}}}}$ </answer>" for k in range(n)]
    shared = mathverify.shared_pool()
    shared.start()
    start = time.monotonic()
    with pytest.warns(UserWarning, match="budget ran out"):
        verdicts = mathgrade.grade_r1v_many(outputs, ["3"] * n, timeout_s=timeout, budget_s=1.5)
    elapsed = time.monotonic() - start
    assert verdicts == [False] * n
    assert elapsed < n * timeout / 2, elapsed  # serially it was n x timeout; start-ups may add a little
    assert grade_r1v("<think>so</think> the answer is 3", "3") is True  # the pool recovers


def test_pool_grades_a_batch_on_all_workers_at_once():
    pool = mathverify.MathVerifyPool(workers=3)
    try:
        pool.start()
        hangs = [mathverify.Check("r1v", "3", f"$9^{{9^{{{9 + k}}}}}$") for k in range(3)]
        start = time.monotonic()
        assert pool.verify_many(hangs, timeout_s=2.0) == [False, False, False]
        elapsed = time.monotonic() - start
        assert elapsed < 4.5, elapsed  # three deadlines side by side (~2 s), not 6 s in a row
        easy = [mathverify.Check("strict", "$2\\sqrt{3}$", "$\\sqrt{12}$"), mathverify.Check("strict", "$1$", "$2$")]
        assert pool.verify_many(easy, timeout_s=30.0) == [True, False]  # fresh children replaced the hung ones
    finally:
        pool.stop()


def test_a_worker_that_cannot_start_is_an_error(monkeypatch):
    monkeypatch.setattr(mathverify._Worker, "CODE", "import sys; sys.exit('no module named math_verify (test)')")
    monkeypatch.setattr(mathverify, "_POOL", mathverify.MathVerifyPool(workers=1))
    mathgrade._verify.cache_clear()
    with pytest.raises(mathverify.MathVerifyUnavailable, match="(?s)did not start.*exited with code 1.*no module named math_verify"):
        get_task("geometry").score(_answer("2\\sqrt{3}"), _example("2√{3}"))
    with pytest.raises(mathverify.MathVerifyUnavailable):
        grade_r1v("the answer is 3", "3")
    mathverify._POOL.stop()
    mathgrade._verify.cache_clear()


# ---- loaders ------------------------------------------------------------------------------------


def test_loads_r1v_test_jsonl_with_relative_image_paths(tmp_path):
    prompts = tmp_path / "src" / "eval" / "prompts"
    (prompts / "Geo170K" / "images" / "test").mkdir(parents=True)
    Image.new("RGB", (30, 20), "white").save(prompts / "Geo170K" / "images" / "test" / "0.png")
    row = {"image_path": "./Geo170K/images/test/0.png", "question": QUESTION, "ground_truth": "140°"}
    (prompts / "geoqa_test_prompts.jsonl").write_text(json.dumps(row, ensure_ascii=False) + "\n")
    task = get_task("geometry")
    (example,) = task.load(str(prompts / "geoqa_test_prompts.jsonl"), split="test")
    assert example["ground_truth"] == "140°" and example["question"] == QUESTION and example["id"] == "0"
    assert message_images(task.messages(example))[0].size == (30, 20)
    assert task.record_fields(example)["image_path"].endswith("Geo170K/images/test/0.png")

    # R1-V keeps images elsewhere (./playground); image_root points there.
    elsewhere = tmp_path / "elsewhere.jsonl"
    elsewhere.write_text(json.dumps(row) + "\n")
    assert len(get_task("geometry", image_root=str(prompts)).load(str(elsewhere), split="test")) == 1
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "Geo170K" / "images" / "test" / "0.png"))):
        task.load(str(elsewhere), split="test")


def test_loads_train_parquet_with_image_bytes(tmp_path):
    import pandas as pd

    rows = [
        {"image": {"bytes": _png(), "path": None}, "problem": QUESTION, "solution": "<answer>140°</answer>"},
        {"image": {"bytes": _png((0, 0, 200)), "path": None}, "problem": "Find x.", "solution": "3cm"},
    ]
    path = tmp_path / "train-00000.parquet"
    pd.DataFrame(rows).to_parquet(path)
    task = get_task("geometry")
    examples = task.load(str(path), split="train")
    assert [e["ground_truth"] for e in examples] == ["140°", "3cm"]
    assert message_images(task.messages(examples[1]))[0].getpixel((0, 0)) == (0, 0, 200)
    assert task.score(_answer("140"), examples[0]).total == 2.0


def test_bad_rows_name_the_file_and_row(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "q", "ground_truth": "1"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl: row 0: expected"):
        get_task("geometry").load(str(path), split="test")
    with pytest.raises(DataError, match="not on the hub"):
        get_task("geometry").load(None, split="test")


# ---- the synthetic twin -------------------------------------------------------------------------


def test_synthetic_twin_is_deterministic_and_its_answers_verify():
    task = get_task("geometry")
    first, again = task.load("synthetic:30", split="train"), task.load("synthetic:30", split="train")
    assert first == again
    assert [e["question"] for e in task.load("synthetic:30", split="test")] != [e["question"] for e in first]
    assert {e["kind"] for e in first} == {"third_angle", "isosceles", "hypotenuse"}
    for example in first:
        numbers = [float(n) for n in re.findall(r"= (\d+)\.0", example["question"])]
        expected = {
            "third_angle": lambda n: 180 - n[0] - n[1],
            "isosceles": lambda n: (180 - n[0]) / 2,
            "hypotenuse": lambda n: (n[1] ** 2 + n[2] ** 2) ** 0.5,  # n = [90, AC, BC]
        }[example["kind"]](numbers)
        assert float(normalize_answer(example["ground_truth"])) == expected
        assert task.score(_answer(f"{expected:g}"), example).total == 2.0
        assert Image.open(io.BytesIO(example["image"])).size == (224, 224)


def test_easy_twin_asks_only_the_six_base_hypotenuses():
    from gpg_vl.registry import get_task

    examples = get_task("geometry", synthetic_easy=True).load("synthetic:60", split="train")
    answers = set()
    for example in examples:
        assert example["kind"] == "hypotenuse"
        ac, bc = (float(v) for v in re.search(r"AC = ([\d.]+), BC = ([\d.]+)", example["question"]).groups())
        assert example["ground_truth"] == f"{round((ac**2 + bc**2) ** 0.5)}cm"
        answers.add(example["ground_truth"])
    assert answers == {"5cm", "13cm", "17cm", "25cm", "10cm", "15cm"}
