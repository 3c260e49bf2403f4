"""GEOQA geometry as R1-V: a figure and a question, a numeric answer graded by mathematical equivalence.

Trains on `leonardPKU/GEOQA_R1V_Train_8K` and evaluates on R1-V's `geoqa_test_prompts.jsonl`. math-verify
runs in one worker process with a deadline per call: its own timeout is `signal.alarm`, which works on the
main thread only, and sympy can hang on inputs like `9^{9^{9}}`. So grading is bounded in time, never raises
and scores the same on any thread. `synthetic[:N]` draws triangles with given angles or sides instead.
"""

from __future__ import annotations

import atexit
import functools
import io
import json
import math
import os
import queue
import random
import re
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from gpg_vl.data import DataError, data_folder, read_records, resolve_image_ref, synthetic_spec, to_pil
from gpg_vl.parsing import extract_answer, format_ok
from gpg_vl.task import RewardOutput, Task

# R1-V's test prompt (src/eval/test_qwen2vl_geoqa.py); its training script puts two spaces before it.
INSTRUCTION = "Output the thinking process in <think> </think> and final answer (number) in <answer> </answer> tags."
PROMPT_STYLES = ("instruct", "base")
MAX_ANSWER_CHARS = 1_000  # a strict answer longer than this is not a number; it is graded wrong unparsed
MAX_OUTPUT_CHARS = 20_000  # r1v parses at most the last 20k characters (R1-V's outputs stop at 1024 tokens)


class GeometryTask(Task):
    """GEOQA (R1-V): reward = format + accuracy, accuracy by math-verify equivalence of the <answer> content."""

    name = "geometry"
    description = "GEOQA geometry (R1-V): numeric answers graded by math-verify; metrics r1v and strict."
    default_train_data = "leonardPKU/GEOQA_R1V_Train_8K"
    default_eval_data = None  # R1-V ships the test set as a JSONL in its repository, not on the hub

    def __init__(
        self, prompt_style: str = "instruct", image_root: str | None = None, verify_timeout_s: float = 5.0, **options
    ):
        super().__init__(**options)
        if prompt_style not in PROMPT_STYLES:
            raise ValueError(f"geometry: prompt_style must be one of {PROMPT_STYLES}, got {prompt_style!r}")
        if not verify_timeout_s > 0:
            raise ValueError(f"geometry: verify_timeout_s must be positive, got {verify_timeout_s!r}")
        self.prompt_style, self.image_root, self.verify_timeout_s = prompt_style, image_root, float(verify_timeout_s)

    def load(self, path: str | None = None, split: str = "train") -> list[dict]:
        path = path or (self.default_train_data if split == "train" else self.default_eval_data)
        if path is None:
            raise DataError(
                "geometry: the GEOQA test set is not on the hub; pass R1-V's src/eval/prompts/geoqa_test_prompts.jsonl "
                "(images under Geo170K/ next to it, or set the task option image_root), or synthetic[:N]"
            )
        spec = synthetic_spec(path, split)
        if spec is not None:
            return make_synthetic(*spec)
        rows = read_records(path, split)
        base_dir = self.image_root or data_folder(path)
        return [_example_from_row(row, i, base_dir, f"{path}: row {i}") for i, row in enumerate(rows)]

    def messages(self, example: dict) -> list[dict]:
        image = to_pil(example["image"], where=f"geometry example {example['id']}")
        return self.conversation([image], f"{example['question']} {INSTRUCTION}")

    def score(self, completion: str, example: dict) -> RewardOutput:
        text = self.full_completion(completion)
        fmt = float(format_ok(text))
        accuracy = float(grade_strict(extract_answer(text), example["ground_truth"], self.verify_timeout_s))
        return RewardOutput(fmt + accuracy, {"format": fmt, "accuracy": accuracy})

    def metrics(self, examples: Sequence[dict], completions: Sequence[str]) -> dict[str, float]:
        """`r1v`: R1-V's test protocol, math-verify on the whole output. `strict`: the <answer> content only.

        r1v reproduces published numbers, flaws included: math-verify takes the last number it can anchor in
        the whole text, which may come from the reasoning, misses numbers glued to tags (`<answer>70</answer>`),
        and reads a bare ground truth `2√{3}` as 2. strict grades the last <answer> block alone, after reading
        units, degree signs, `√{}` and `π` as LaTeX (see `normalize_answer`), so `140` = `140°`, `2\\sqrt{3}` =
        `2√{3}` and `2` != `2√{3}`.
        """
        if len(examples) != len(completions):
            raise ValueError(f"{len(examples)} examples but {len(completions)} completions")
        if not examples:
            return {"r1v": 0.0, "strict": 0.0}
        texts = [c if isinstance(c, str) else "" for c in completions]
        r1v = [grade_r1v(c, ex["ground_truth"], self.verify_timeout_s) for ex, c in zip(examples, texts)]
        strict = [self.score(c, ex).components["accuracy"] for ex, c in zip(examples, completions)]
        return {"r1v": sum(r1v) / len(examples), "strict": sum(strict) / len(examples)}

    def parse_answer(self, completion: str) -> str | None:
        return extract_answer(self.full_completion(completion))

    def record_fields(self, example: dict) -> dict[str, Any]:
        fields = {k: example[k] for k in ("id", "question", "ground_truth", "kind") if k in example}
        if isinstance(example.get("image"), str):
            fields["image_path"] = example["image"]
        return fields



# ---- loading ------------------------------------------------------------------------------------



def _example_from_row(row: Any, index: int, base_dir: str | None, where: str) -> dict:
    """R1-V's test row (image_path, question, ground_truth) or the hub train row (image, problem, solution)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if {"image_path", "question", "ground_truth"} <= set(row):
        image, question, truth = row["image_path"], row["question"], row["ground_truth"]
    elif {"image", "problem", "solution"} <= set(row):
        image, question, truth = row["image"], row["problem"], row["solution"]
        truth = extract_answer(str(truth)) or str(truth)  # the solution is "<answer> 140° </answer>"
    else:
        raise DataError(
            f"{where}: expected (image_path, question, ground_truth) or (image, problem, solution), got {sorted(row)}"
        )
    if not str(truth).strip() or not str(question).strip():
        raise DataError(f"{where}: empty question or ground truth")
    return {
        "id": str(row.get("id", index)),
        "image": resolve_image_ref(image, base_dir, where),
        "question": str(question).strip(),
        "ground_truth": str(truth).strip(),
    }



# ---- grading ------------------------------------------------------------------------------------

_DELIMITERS = re.compile(r"^\s*(?:\$+|\\\(|\\\[)|(?:\$+|\\\)|\\\])\s*$")
_BOXED = re.compile(r"^\\boxed\{(.*)\}$", re.DOTALL)
_PROSE_PREFIX = re.compile(r"^.*(?:\bis\b|\banswer\s*:|=)", re.DOTALL | re.IGNORECASE)  # "C is 70", "x = 70"
# A trailing unit or degree sign after a number, brace, bracket, π or space: the GEOQA test set's units.
_UNITS = "|".join(
    [r"°", r"\^\s*\{?\s*\\circ\s*\}?", r"\\circ", r"degrees?", r"度"]  # angles
    + [r"[cmdk]?m", r"units?", r"平方厘米", r"平方米", r"[厘毫分千]?米", r"海里", r"秒", r"小时", r"分钟"]  # lengths, time
)
_POWER = r"(?:\s*\^\s*\{?\s*[23]\s*\}?\^?|²|³)?"  # cm^2, cm^{2}, cm², GEOQA's "cm^2^"
_UNIT = re.compile(
    # Possessive `\s*+`: no unit starts with a space, and two plain `\s*` around the optional `\text{` split a
    # run of spaces every possible way (cubic: 1000 spaces took 10 s).
    r"(?<=[\d})π\s])\s*+(?:(?:\\text\{|\\mathrm\{)\s*+)?" + rf"(?:{_UNITS})(?:\s*\}})?{_POWER}(?:\s*\}})?\s*$"
)
_SQRT_BARE = re.compile(r"\\sqrt\s*(\d+(?:\.\d+)?)")
_SQRT_CALL = re.compile(r"\\?sqrt\s*\(([^()]*)\)")  # "2sqrt(3)" -> "2\sqrt{3}"
_PLAIN_PI = re.compile(r"(?<![\\A-Za-z])pi(?![A-Za-z])")  # "8pi" -> "8\pi"
_NUMBER = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)$")
_WORD = re.compile(r"[A-Za-z]{2,}")
# Powers with a 4+ digit or nested exponent, and factorials, make sympy compute for minutes; no GEOQA answer
# has one, so they are graded wrong without asking math-verify.
_HANG_PRONE = re.compile(r"\^\s*\{?\s*[\d.]{4,}|\^\s*\{[^{}]*\^|\^\s*\d+\s*\^|!")


@functools.lru_cache(maxsize=65536)
def normalize_answer(text: str) -> str:
    """An answer as one LaTeX expression: delimiters, `\\boxed{}`, a prose or `x =` prefix, units, `°` removed;
    `√{3}` -> `\\sqrt{3}`, `π` -> `\\pi`. E.g. `∠C = 70°` -> `70`, `2√{3}cm` -> `2\\sqrt{3}`."""
    s = _DELIMITERS.sub("", text.strip()).strip()
    boxed = _BOXED.match(s)
    s = (boxed.group(1) if boxed else s).strip().rstrip(".。").strip()
    s = _PROSE_PREFIX.sub("", s).strip()
    for _ in range(3):  # "25πcm^{2}" has one unit; a few rounds cover "3 cm." and "cm}" leftovers
        stripped = _UNIT.sub("", s).strip()
        if stripped == s or not stripped:
            break
        s = stripped
    s = _PLAIN_PI.sub(r"\\pi ", _SQRT_CALL.sub(r"\\sqrt{\1}", s))
    s = s.replace("√", "\\sqrt").replace("π", "\\pi ").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return _SQRT_BARE.sub(r"\\sqrt{\1}", s).strip()


def grade_strict(answer: str | None, ground_truth: str, timeout_s: float = 5.0) -> bool:
    """True when the <answer> content equals the ground truth mathematically (units and `°` ignored)."""
    if not answer or len(answer) > MAX_ANSWER_CHARS:
        return False
    pred, gold = normalize_answer(answer), normalize_answer(ground_truth)
    if not pred or _WORD.search(re.sub(r"\\[A-Za-z]+", "", pred)) or _HANG_PRONE.search(pred):
        return False  # prose left over, or an expression built to stall sympy
    if _NUMBER.match(pred) and _NUMBER.match(gold):
        return math.isclose(float(pred), float(gold), rel_tol=1e-9, abs_tol=1e-9)  # the common case, no worker
    return _verify("strict", f"${gold}$", f"${pred}$", timeout_s)


def grade_r1v(output: str, ground_truth: str, timeout_s: float = 5.0) -> bool:
    """R1-V's test-script rule: `verify(parse(output), parse(ground_truth))` on the whole output."""
    return _WORKER.check("r1v", ground_truth, output[-MAX_OUTPUT_CHARS:], timeout_s)


@functools.lru_cache(maxsize=65536)
def _verify(op: str, gold: str, pred: str, timeout_s: float) -> bool:
    # Cached (short answers only): a group of rollouts repeats answers, and a string that timed out once
    # would time out again.
    return _WORKER.check(op, gold, pred, timeout_s)


class _MathVerifyWorker:
    """One child process running math-verify; each call waits at most `timeout_s` for its reply.

    A call that overruns kills the child (a fresh one starts on the next call) and counts as wrong. Calls
    from several threads take turns. The child only needs `math_verify`, so it starts in about a second.
    """

    STARTUP_TIMEOUT_S = 120.0

    def __init__(self) -> None:
        self._owner = os.getpid()
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._replies: queue.Queue = queue.Queue()
        self._next_id = 0
        self._failed = False

    def check(self, op: str, gold: str, pred: str, timeout_s: float) -> bool:
        if self._owner != os.getpid():
            self.__init__()  # a forked copy (e.g. a data-loader worker) must not share the parent's pipes
        with self._lock:
            if self._failed:
                return False
            try:
                return self._ask({"op": op, "gold": gold, "pred": pred}, timeout_s)
            except Exception as e:  # a broken pipe or a dead child must not stop training
                self.stop()
                warnings.warn(f"geometry: math-verify worker failed ({type(e).__name__}: {e}); graded as wrong")
                return False

    def _ask(self, request: dict, timeout_s: float) -> bool:
        proc = self._proc if self._proc is not None and self._proc.poll() is None else self._start()
        if proc is None:
            return False
        self._next_id += 1
        proc.stdin.write(json.dumps({**request, "id": self._next_id}) + "\n")
        proc.stdin.flush()
        reply = self._reply(time.monotonic() + timeout_s, self._next_id)
        if reply is None:
            self.stop()  # hung or died: sympy cannot be interrupted, so the process goes
            return False
        return bool(reply.get("ok"))

    def _reply(self, deadline: float, wanted: int | str) -> dict | None:
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                reply = self._replies.get(timeout=remaining)
            except queue.Empty:
                return None
            if reply is None:  # end of the child's stdout
                return None
            if reply.get("id") == wanted:
                return reply
        return None

    def _start(self) -> subprocess.Popen | None:
        self.stop()
        self._replies = queue.Queue()
        code = "from gpg_vl_tasks.geometry import serve_math_verify; serve_math_verify()"
        # The child sees the parent's import path, so a source checkout works as well as an install.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        proc = subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            encoding="utf-8",
            bufsize=1,
        )
        threading.Thread(target=_pump, args=(proc.stdout, self._replies), daemon=True).start()
        self._proc = proc
        if self._reply(time.monotonic() + self.STARTUP_TIMEOUT_S, "ready") is None:
            self.stop()
            self._failed = True  # do not pay a two-minute start on every answer
            warnings.warn("geometry: the math-verify worker did not start; non-numeric answers are graded as wrong")
            return None
        return proc

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None and self._owner == os.getpid():
            proc.kill()
            proc.wait()


def _pump(stream, replies: queue.Queue) -> None:
    """Reader thread: the child's reply lines into a queue, None at end of stream."""
    for line in stream:
        try:
            replies.put(json.loads(line))
        except json.JSONDecodeError:
            continue
    replies.put(None)


_WORKER = _MathVerifyWorker()
atexit.register(_WORKER.stop)


def serve_math_verify() -> None:
    """The worker's main loop: JSON requests on stdin, one JSON reply per line on stdout."""
    import logging

    try:
        import resource

        # A runaway sympy integer fails with MemoryError instead of swapping the machine.
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    except (ImportError, ValueError, OSError):
        pass
    logging.disable(logging.WARNING)  # math-verify warns on every call that its own timeout is off
    from math_verify import parse, verify

    out, sys.stdout = sys.stdout, sys.stderr  # stray prints must not corrupt the reply stream

    @functools.lru_cache(maxsize=2048)  # ground truths repeat; whole r1v outputs (<= 20k chars) rarely do
    def parsed(text: str):
        # Timeouts off: they use signal.alarm; the parent's deadline bounds the call instead.
        return parse(text, parsing_timeout=None)

    def answer(request: dict) -> bool:
        if request["op"] == "r1v":  # R1-V: verify(parse(output), parse(ground_truth)), argument order kept
            return verify(parsed(request["pred"]), parsed(request["gold"]), timeout_seconds=None)
        return verify(parsed(request["gold"]), parsed(request["pred"]), timeout_seconds=None)

    parsed("$1$")  # builds math-verify's grammars before "ready", so the first deadline is not spent on it
    out.write(json.dumps({"id": "ready"}) + "\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            ok = bool(answer(request))
        except Exception:  # MemoryError and sympy errors are wrong answers
            ok = False
        out.write(json.dumps({"id": request["id"], "ok": ok}) + "\n")
        out.flush()


# ---- the synthetic twin -------------------------------------------------------------------------

_TRIPLES = ((3, 4, 5), (5, 12, 13), (8, 15, 17), (7, 24, 25), (6, 8, 10), (9, 12, 15))


def make_synthetic(size: int, seed: int) -> list[dict]:
    """`size` drawn triangle problems in GEOQA's style; example i depends only on (seed, i)."""
    return [_synthetic_example(random.Random(seed * 1_000_003 + i), i) for i in range(size)]


def _synthetic_example(rng: random.Random, index: int) -> dict:
    kind = rng.choice(("third_angle", "isosceles", "hypotenuse"))
    if kind == "third_angle":
        a, b = rng.randint(25, 95), rng.randint(25, 95)
        while a + b > 155:
            a, b = rng.randint(25, 95), rng.randint(25, 95)
        question = f"in triangle ABC, angle A = {a}.0, angle B = {b}.0, then the degree of angle C is ()"
        answer, points, labels = f"{180 - a - b}°", _triangle(a, b), {"A": f"{a}°", "B": f"{b}°"}
    elif kind == "isosceles":
        apex = rng.randrange(20, 141, 2)  # even, so the base angles are whole degrees
        question = f"in triangle ABC, AB = AC, angle A = {apex}.0, then the degree of angle B is ()"
        base = (180 - apex) // 2
        answer, points, labels = f"{base}°", _triangle(base, base, apex_name="A"), {"A": f"{apex}°"}
    else:
        k = rng.randint(1, 3)
        ac, bc, ab = (k * n for n in rng.choice(_TRIPLES))
        question = f"in triangle ABC, angle C = 90.0, AC = {ac}.0, BC = {bc}.0, then the length of AB is ()"
        points = {"C": (0.0, 0.0), "A": (0.0, float(ac)), "B": (float(bc), 0.0)}
        answer, labels = f"{ab}cm", {"AC": str(ac), "BC": str(bc)}
    return {
        "id": f"synthetic-{index}",
        "image": _draw(points, labels),
        "question": f"As shown in the figure, {question}",  # GEOQA's opening
        "ground_truth": answer,
        "kind": kind,
    }


def _triangle(angle_a: float, angle_b: float, apex_name: str = "C") -> dict[str, tuple[float, float]]:
    """Vertices (y up) of a triangle with the given base angles on a unit base; the apex gets `apex_name`."""
    ra, rb = math.radians(angle_a), math.radians(angle_b)
    side = math.sin(rb) / math.sin(ra + rb)  # law of sines: the side from the first base vertex to the apex
    names = [n for n in "ABC" if n != apex_name]
    return {names[0]: (0.0, 0.0), names[1]: (1.0, 0.0), apex_name: (side * math.cos(ra), side * math.sin(ra))}


def _draw(points: dict[str, tuple[float, float]], labels: dict[str, str], size: int = 224) -> bytes:
    """PNG bytes of the triangle fitted into a square canvas, vertex names and the given values written on it."""
    xs, ys = [p[0] for p in points.values()], [p[1] for p in points.values()]
    scale = (size - 64) / max(max(xs) - min(xs), max(ys) - min(ys))
    pixel = {n: (32 + (x - min(xs)) * scale, size - 32 - (y - min(ys)) * scale) for n, (x, y) in points.items()}
    cx, cy = sum(p[0] for p in pixel.values()) / 3, sum(p[1] for p in pixel.values()) / 3
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=14)
    draw.polygon(list(pixel.values()), outline="black", width=2)
    for name, (x, y) in pixel.items():
        dx, dy = x - cx, y - cy  # vertex names go outside the triangle, given values inside
        norm = math.hypot(dx, dy) or 1.0
        draw.text((x + 14 * dx / norm, y + 14 * dy / norm), name, fill="black", font=font, anchor="mm")
        if name in labels:
            draw.text((x - 26 * dx / norm, y - 26 * dy / norm), labels[name], fill="blue", font=font, anchor="mm")
    for side, text in labels.items():
        if len(side) == 2:
            (x1, y1), (x2, y2) = pixel[side[0]], pixel[side[1]]
            draw.text(((x1 + x2) / 2 + 10, (y1 + y2) / 2 - 10), text, fill="blue", font=font, anchor="mm")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
