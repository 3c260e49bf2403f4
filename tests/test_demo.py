"""The demo: its comparison and rollout inspector through `gradio_client` and in a real headless Chromium,
plus its safety rules and limits.

One server per module (two random tiny checkpoints and a run folder), closed at the end. The browser tests
are marked `browser` and skip when chromium/chromedriver are missing; with GPG_VL_SCREENSHOT=PATH the
comparison test writes its screenshot there (docs/demo.png), and with GPG_VL_INSPECTOR_SCREENSHOT=PATH the
inspector test does (docs/inspector.png; GPG_VL_INSPECTOR_RUN=FOLDER shows that run instead of the fixture's).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("gradio")

from gpg_vl_demo.app import MAX_QUEUED, build_app, launch  # noqa: E402
from gpg_vl_demo.backend import MAX_CHECKPOINTS, MAX_NEW_TOKENS, SOURCES, DemoBackend  # noqa: E402
from gpg_vl_demo.boxes import (  # noqa: E402
    GT_COLOR,
    PRED_COLORS,
    draw_boxes,
    ground_truth_box,
    model_to_pixels,
    parse_box,
    predicted_box,
    truth_in_pixels,
)
from gpg_vl_demo.checkpoints import CheckpointAllowList, UnknownCheckpoint  # noqa: E402
from gpg_vl_demo.inputs import MAX_QUESTION_CHARS, MAX_UPLOAD_BYTES, UploadError, read_upload, upload_prompt  # noqa: E402
from gpg_vl_demo.runs import eval_curves, read_metrics, reward_curve  # noqa: E402

MAX_TOKENS = 12  # enough to see output, cheap on the CPU
HOSTILE = '<img src=x onerror="document.title=1">'  # a completion that must show as text, never as markup


def samples_rows() -> list[dict]:
    """Two groups of a logged step in the trainer's samples.jsonl schema: one valid, one not."""
    valid = {
        "step": 3, "prompt": "What colour is the shape?", "image": "samples/step-000003-0.png",
        "completions": ["<answer>(B)</answer>", HOSTILE], "rewards": [2.0, 0.0],
        "components": [{"format": 1.0, "accuracy": 1.0}, {"format": 0.0, "accuracy": 0.0}], "valid": True,
        "finish_reasons": ["stop", "length"], "advantages": [1.0, -1.0],
        "tokens": [["<answer>", "(B)", "</answer>", "<|im_end|>"], ['<img src=x onerror="', 'document.title=1">']],
        "logprobs": [[-0.01, -2.5, -0.02, -0.05], [-0.7, -4.0]],
    }
    flat = {**valid, "image": "samples/step-000003-1.png", "completions": ["x", "y"], "rewards": [1.0, 1.0],
            "valid": False, "advantages": [0.0, 0.0], "tokens": [["x"], ["y"]], "logprobs": [[-0.1], [-0.2]]}
    return [valid, flat]


# ---- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two tiny random checkpoints, a run folder (metrics + one saved step) and a broken checkpoint."""
    from gpg_vl.tiny import make_tiny

    root = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPG_VL_CACHE", str(root / "cache"))
        a = make_tiny(root / "ckpt-a", seed=0)
        b = make_tiny(root / "ckpt-b", seed=1)
        run = root / "run"
        shutil.copytree(a, run / "checkpoint-2")
        lines = [{"step": s, "reward_mean": 0.2 + 0.1 * s, "loss": 0.1} for s in range(1, 5)]
        lines[1]["eval/accuracy"], lines[3]["eval/accuracy"] = 0.3, 0.6
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + '\n{"step": 5, "rew')
        (run / "samples").mkdir()
        for i, colour in enumerate([(20, 160, 60), (200, 40, 40)]):
            Image.new("RGB", (56, 56), colour).save(run / "samples" / f"step-000003-{i}.png")
        (run / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples_rows()))
        broken = root / "broken"
        broken.mkdir()
        (broken / "config.json").write_text("{ not json")
        yield {"a": str(a), "b": str(b), "run": str(run), "broken": str(broken), "root": root}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(folders):
    """The demo app on a free localhost port; closed when the module's tests are done."""
    app = build_app([folders["a"], folders["b"]], [folders["run"]], task="shapes", data="synthetic:8", split="test", device="cpu")
    _, url, _ = launch(app, host="127.0.0.1", port=free_port(), block=False)
    try:
        yield app, url
    finally:
        app.close()


# ---- (a) the comparison through gradio_client ------------------------------------------------------


def compare_args(labels, steps=(), greedy=True, source=SOURCES[0], upload=None, question=""):
    return dict(
        choice=source, index=1, upload_path=upload, question_text=question, model_labels=list(labels),
        step_labels=list(steps), style_name="instruct", greedy_on=greedy, temp=1.0, max_tokens=MAX_TOKENS,
        seed_value=0, api_name="/compare",
    )


def test_client_compares_two_checkpoints(server):
    from gradio_client import Client

    _, url = server
    client = Client(url, verbose=False)
    image, table, cards, raw, status = client.predict(**compare_args(["ckpt-a", "ckpt-b"]))
    assert [r["checkpoint"] for r in raw] == ["ckpt-a", "ckpt-b"]
    for r in raw:
        assert r["error"] is None
        assert isinstance(r["completion"], str) and r["seconds"] > 0
        assert isinstance(r["reward"], float) and set(r["components"]) == {"format", "accuracy"}
    assert table["headers"][:2] == ["checkpoint", "reward"] and len(table["data"]) == 2
    assert "ckpt-a" in cards and "ckpt-b" in cards and "reward" in cards
    assert "Ran 2 checkpoint(s) on example 1" in status
    assert Path(image).is_file()
    # the same request again reuses the loaded models and, greedy with one seed, says the same
    again = client.predict(**compare_args(["ckpt-a", "ckpt-b"]))[3]
    assert [r["completion"] for r in again] == [r["completion"] for r in raw]
    assert all(r["load_seconds"] is None for r in again)


def test_client_opens_run_and_compares_a_saved_step(server):
    from gradio_client import Client

    _, url = server
    client = Client(url, verbose=False)
    steps, rewards, evals, summary = client.predict("run", api_name="/open_run")
    assert steps["choices"] == [["run/checkpoint-2", "run/checkpoint-2"]]
    assert "4 steps logged" in summary  # the half-written 5th line is skipped
    assert len(rewards["data"]) == 4 and len(evals["data"]) == 2
    raw = client.predict(**compare_args(["ckpt-a"], steps=["run/checkpoint-2"], greedy=False))[3]
    assert [r["checkpoint"] for r in raw] == ["ckpt-a", "run/checkpoint-2"]
    assert all(r["error"] is None and r["reward"] is not None for r in raw)


def test_client_upload_without_truth_and_bad_requests(server, folders, tmp_path):
    from gradio_client import Client, handle_file

    _, url = server
    client = Client(url, verbose=False)
    with pytest.raises(Exception, match="not in the list of choices"):  # a path, not an offered label
        client.predict(**compare_args([folders["b"]]))
    good = tmp_path / "mine.png"
    Image.new("RGB", (90, 60), (200, 30, 30)).save(good)
    out = client.predict(**compare_args(["ckpt-b"], source=SOURCES[1], upload=handle_file(str(good)), question="What colour?"))
    assert out[3][0]["reward"] is None and "No ground truth" in out[4]
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    out = client.predict(**compare_args(["ckpt-b"], source=SOURCES[1], upload=handle_file(str(text)), question="What colour?"))
    assert "not an image" in out[4] and out[3] == []
    assert client.predict(**compare_args(["ckpt-a"]))[3][0]["error"] is None  # the server is still serving


def test_client_inspects_a_logged_step(server):
    from gradio_client import Client

    _, url = server
    client = Client(url, verbose=False)
    steps, info, step_md, page = client.predict("run", api_name="/inspect_run")
    assert steps["value"] == 3 and "1 step(s)" in info and "**Step 3**" in step_md
    assert page.count('class="gpg-group"') == 2 and "not valid" in page
    assert "<img src=x" not in page and "&lt;img src=x onerror=" in page  # the completion is escaped
    step_md, page = client.predict("run", 3, api_name="/inspect_step")
    assert "reward_mean" in step_md and "gpg-tok" in page


def test_inspector_is_not_held_up_by_a_running_comparison(server, monkeypatch):
    """A comparison that hangs (here: held until the test lets go) does not delay the inspector, which runs
    on its own queue; the comparison then finishes normally."""
    from gradio_client import Client

    app, url = server
    policy = app.backend.cache.get(app.backend.allow.resolve("ckpt-a"))
    entered, release, generate = threading.Event(), threading.Event(), policy.engine.generate

    def held(prompts, params):
        entered.set()
        assert release.wait(120), "the test never released the comparison"
        return generate(prompts, params)

    monkeypatch.setattr(policy.engine, "generate", held)
    client = Client(url, verbose=False)
    job = client.submit(**compare_args(["ckpt-a"]))
    try:
        assert entered.wait(120), "the comparison never started"
        inspected = client.submit("run", 3, api_name="/inspect_step").result(timeout=60)  # while it is held
        assert "gpg-group" in inspected[1]
    finally:
        release.set()
    assert job.result(timeout=120)[3][0]["error"] is None
    assert app._queue.max_size == MAX_QUEUED  # a flood of requests is refused, not queued without end


# ---- (b) a real headless Chromium ------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


needs_browser = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver")


@contextmanager
def chrome(tmp_path, monkeypatch):
    """A headless Chromium that reaches nothing but localhost; quit on exit."""
    webdriver = pytest.importorskip("selenium.webdriver")
    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium-manager must not try to download anything
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def full_page_screenshot(driver, shot: Path, env: str) -> None:
    """Grow the window to the whole page (the viewport is a little shorter than the window), shoot, and copy
    the picture to $env when it is set."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, min(height + 160, 4000))
    driver.execute_script("window.scrollTo(0, 0)")
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get(env):
        Path(os.environ[env]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, os.environ[env])


@pytest.mark.browser
@needs_browser
def test_browser_runs_a_comparison(server, tmp_path, monkeypatch):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _, url = server
    with chrome(tmp_path, monkeypatch) as driver:
        driver.get(url)
        wait = WebDriverWait(driver, 60)
        button = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#compare-btn"))
        driver.find_element(By.CSS_SELECTOR, "#greedy input[type=checkbox]").click()  # sample, so the two differ
        tokens = driver.find_element(By.CSS_SELECTOR, "#max-new-tokens input[type=number]")
        tokens.clear()
        tokens.send_keys(str(MAX_TOKENS * 2), "\t")
        button.click()
        cards = wait.until(lambda d: _text_with(d, "#cards", "ckpt-a", "ckpt-b", "reward"))
        assert "full completion" in cards
        scores = driver.find_element(By.CSS_SELECTOR, "#scores").text
        assert "ckpt-a" in scores and "ckpt-b" in scores and "reward" in scores
        assert "Ran 2 checkpoint(s)" in driver.find_element(By.CSS_SELECTOR, "#status").text
        full_page_screenshot(driver, tmp_path / "demo.png", "GPG_VL_SCREENSHOT")


@pytest.mark.browser
@needs_browser
def test_browser_inspects_a_runs_rollouts_without_checkpoints(folders, tmp_path, monkeypatch):
    """`gpg-vl demo --run RUN` alone: the inspector tab shows the latest logged step, its groups, validity,
    advantages and coloured tokens; a hostile completion stays text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    given = os.environ.get("GPG_VL_INSPECTOR_RUN")
    run = Path(given) if given else Path(folders["root"]) / "inspect-only"
    if not given:  # the fixture run's samples, without its checkpoint: nothing here needs a model
        run.mkdir(exist_ok=True)
        for name in ("samples", "samples.jsonl", "metrics.jsonl"):
            src = Path(folders["run"]) / name
            (shutil.copytree if src.is_dir() else shutil.copyfile)(src, run / name)
    app = build_app([], [str(run)], task="shapes", data="synthetic:4", split="test", device="cpu")
    _, url, _ = launch(app, host="127.0.0.1", port=free_port(), block=False)
    try:
        with chrome(tmp_path, monkeypatch) as driver:
            driver.get(url)
            wait = WebDriverWait(driver, 60)
            tab = wait.until(lambda d: next((b for b in d.find_elements(By.CSS_SELECTOR, "button[role=tab]") if "Rollout inspector" in b.text), None))
            tab.click()
            page = wait.until(lambda d: _text_with(d, "#inspector", "Group 1", "advantage"))
            assert "valid" in page and "Token colour" in page
            assert driver.find_elements(By.CSS_SELECTOR, "#inspector span.gpg-tok[title^='log-prob']")
            assert driver.find_elements(By.CSS_SELECTOR, "#inspector img.gpg-img")  # the prompt image, inlined
            assert wait.until(lambda d: _text_with(d, "#inspect-step-md", "Step"))
            if not given:
                assert "Group 2" in page and "not valid" in page and "+1.000" in page
                assert HOSTILE in page  # shown as text ...
                assert not driver.find_elements(By.CSS_SELECTOR, "#inspector img[src=x]")  # ... never as an element
                assert driver.title != "1"
            full_page_screenshot(driver, tmp_path / "inspector.png", "GPG_VL_INSPECTOR_SCREENSHOT")
    finally:
        app.close()


def _text_with(driver, selector: str, *needles: str) -> str | bool:
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, selector)
    text = found[0].text if found else ""
    return text if all(n in text for n in needles) else False


# ---- (c) safety rules and helpers, no server --------------------------------------------------------


def test_allow_list_refuses_paths_not_given(folders):
    allow = CheckpointAllowList([folders["a"]], [folders["run"]])
    assert allow.model_choices() == ["ckpt-a"]
    assert allow.resolve("ckpt-a").path == folders["a"]
    assert allow.resolve("run/checkpoint-2").path == str(Path(folders["run"]) / "checkpoint-2")
    for label in (folders["b"], "ckpt-b", "/etc", "run/checkpoint-2/../../ckpt-b", "run/checkpoint-9", "run", "../ckpt-b"):
        with pytest.raises(UnknownCheckpoint):
            allow.resolve(label)


def test_comparison_refuses_unknown_label_and_reports_load_failure(folders):
    backend = DemoBackend([folders["broken"]], task="shapes", data="synthetic:2", split="test")
    view = backend.comparison(SOURCES[0], 0, None, "", [folders["a"]], "instruct", True, 1.0, 4, 0)
    assert view.raw == [] and "Refused" in view.status
    view = backend.comparison(SOURCES[0], 0, None, "", ["broken"], "instruct", True, 1.0, 4, 0)
    assert "could not load this checkpoint" in view.raw[0]["error"] and view.warnings
    assert "could not load" in view.cards


def test_generation_error_becomes_a_message(folders, monkeypatch):
    backend = DemoBackend([folders["a"]], task="shapes", data="synthetic:2", split="test")
    policy = backend.cache.get(backend.allow.resolve("ckpt-a"))

    def explode(prompts, params):
        raise RuntimeError("out of memory\nlong trace")

    monkeypatch.setattr(policy.engine, "generate", explode)
    view = backend.comparison(SOURCES[0], 0, None, "", ["ckpt-a"], "instruct", True, 1.0, 4, 0)
    assert view.raw[0]["error"] == "generation failed: RuntimeError: out of memory"
    assert view.warnings == ["ckpt-a: generation failed: RuntimeError: out of memory"]


def test_grounding_example_shows_its_truth_box(folders):
    try:
        backend = DemoBackend([folders["broken"]], task="lisa", data="synthetic:2", split="test")
    except Exception as e:  # the grounding plugin is not installed here
        pytest.skip(f"task lisa unavailable: {e}")
    image, text = backend.example_view(1, "instruct")
    assert max(image.size) >= 448 and "box" in text
    assert GT_COLOR in {color for _, color in image.getcolors(1 << 20)}


def test_bad_uploads_give_messages(tmp_path):
    text = tmp_path / "x.png"
    text.write_text("hello")
    with pytest.raises(UploadError, match="not an image"):
        read_upload(text)
    big = tmp_path / "big.png"
    with open(big, "wb") as f:
        f.truncate(MAX_UPLOAD_BYTES + 1)  # sparse: nothing is written
    with pytest.raises(UploadError, match="MB"):
        read_upload(big)
    wide = tmp_path / "wide.png"
    Image.new("L", (5000, 4)).save(wide)
    with pytest.raises(UploadError, match="5000x4"):
        read_upload(wide)
    with pytest.raises(UploadError, match="Upload an image"):
        read_upload(None)
    ok = tmp_path / "ok.png"
    Image.new("RGBA", (30, 20)).save(ok)
    assert read_upload(ok).mode == "RGB"


def test_parse_box_and_ground_truth():
    assert parse_box("<answer>[10, 20.5, 30, 40]</answer>") == (10, 20.5, 30, 40)
    assert parse_box("(300,400),(100,200)") == (100, 200, 300, 400)  # corners given swapped are sorted
    assert parse_box("no box here 1 2 3") is None and parse_box("") is None and parse_box(None) is None
    assert ground_truth_box({"boxes": [[1, 2, 3, 4], [5, 6, 7, 8]]}) == (1, 2, 3, 4)
    assert ground_truth_box({"solution": "<answer>140</answer>"}) is None
    assert ground_truth_box({"answer": "(B)"}) is None


def test_box_coordinates_mapped_back_to_the_image():
    from gpg_vl.registry import get_task

    from gpg_vl.images import ImageBudget

    class Other:
        name, image_budget = "other", ImageBudget(56 * 56, 112 * 112, 28)

    assert model_to_pixels((500, 0, 1000, 500), get_task("lisa"), (200, 100)) == (100, 0, 200, 50)
    # a 224x224 image is shown to the model at 112x112: its box doubles
    assert model_to_pixels((10, 10, 56, 56), Other(), (224, 224)) == (20, 20, 112, 112)


@pytest.mark.parametrize("name", ["lisa", "refcoco"])
def test_grounding_task_boxes_land_on_the_truth(name):
    """A completion that answers the true box, in the task's own answer form, is drawn on the true pixels."""
    from gpg_vl.images import ImageBudget, message_images, smart_resize
    from gpg_vl.registry import get_task

    try:
        task = get_task(name)
    except Exception as e:  # the grounding plugin is not installed here
        pytest.skip(f"task {name} unavailable: {e}")
    task.configure_images(ImageBudget(56 * 56, 112 * 112, 28))
    example = task.load("synthetic:1", split="test")[0]
    image = message_images(task.messages(example))[0]
    x1, y1, x2, y2 = example["box"]
    if name == "lisa":  # truth and answer on the 0-1000 scale
        answer = f"({x1:.0f},{y1:.0f}),({x2:.0f},{y2:.0f})"
    else:  # the answer is in pixels of the resized image the model saw
        seen_h, seen_w = smart_resize(image.height, image.width, 56 * 56, 112 * 112)
        sx, sy = seen_w / image.width, seen_h / image.height
        answer = f"[{x1 * sx:.2f}, {y1 * sy:.2f}, {x2 * sx:.2f}, {y2 * sy:.2f}]"
    completion = f"<think>there</think><answer>{answer}</answer>"
    truth = truth_in_pixels(task, example, image.size)
    predicted = predicted_box(task, completion, image, example)
    assert predicted is not None and all(abs(p - t) < 2.0 for p, t in zip(predicted, truth))
    assert task.score(completion, example).components["iou"] > 0.95
    assert predicted_box(task, "<answer>nothing</answer>", image, example) is None


def test_draw_boxes_draws_truth_and_prediction():
    image = Image.new("RGB", (100, 100), (255, 255, 255))
    drawn = draw_boxes(image, [("ckpt-a", (60, 60, 90, 90))], ground_truth=(10, 40, 50, 80))
    assert drawn.size == (448, 448)  # small images are enlarged for legible labels
    zoom = 448 / 100
    assert drawn.getpixel((int(30 * zoom), int(80 * zoom) - 1)) == GT_COLOR  # bottom edge of the truth
    assert drawn.getpixel((int(75 * zoom), int(90 * zoom) - 1)) == PRED_COLORS[0]
    assert drawn.getpixel((int(75 * zoom), int(75 * zoom))) == (255, 255, 255)  # inside stays untouched
    assert image.getpixel((10, 40)) == (255, 255, 255)  # the original is not modified


def test_run_metrics_tolerate_a_partial_line(folders):
    records = read_metrics(folders["run"])
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert list(reward_curve(records)["metric"].unique()) == ["reward_mean"]
    assert eval_curves(records)["step"].tolist() == [2, 4]
    assert read_metrics(folders["root"]) == []


def test_cli_demo_needs_a_model_and_binds_loopback(capsys):
    import argparse

    from gpg_vl.cli import main
    from gpg_vl_demo.app import add_arguments

    assert main(["demo"]) == 2
    assert "give at least one --model PATH or --run RUN_FOLDER" in capsys.readouterr().err
    parser = argparse.ArgumentParser()
    add_arguments(parser, "demo")
    args = parser.parse_args(["--model", "a", "--model", "b", "--run", "r1", "r2"])
    assert (args.model, args.run, args.host, args.port, args.share) == (["a", "b"], ["r1", "r2"], "127.0.0.1", 7860, False)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "a", "--port", "0"], "--port must be between 1 and 65535, got 0"),
        (["--model", "a", "--port", "70000"], "--port must be between 1 and 65535, got 70000"),
        (["--model", "a", "--host", "bad host!"], "--host must be an IP address or a host name, got 'bad host!'"),
        (["--run", "/nonexistent/run"], "--run /nonexistent/run: no such folder"),
        (["--model", "./no/such/checkpoint"], "--model ./no/such/checkpoint: no such folder"),
    ],
)
def test_cli_demo_refuses_bad_options_in_one_line(argv, message, capsys):
    from gpg_vl.cli import main

    assert main(["demo", *argv]) == 2
    err = capsys.readouterr().err
    assert err == f"gpg-vl demo: error: {message}\n"  # one line, naming the option


def test_cli_demo_accepts_good_options():
    import argparse

    from gpg_vl_demo.app import check_options

    for host in ("127.0.0.1", "::1", "0.0.0.0", "localhost", "my-box.lan"):
        args = argparse.Namespace(model=["builtin:tiny"], run=[], host=host, port=7860)
        assert check_options(args) is None, host


def test_long_questions_and_oversized_requests_are_refused(folders, tmp_path):
    backend = DemoBackend([folders["a"], folders["b"]], task="shapes", data="synthetic:2", split="test")
    image = tmp_path / "mine.png"
    Image.new("RGB", (60, 60), (200, 30, 30)).save(image)
    long_question = "what? " * 400  # 2,400 characters
    view = backend.comparison(SOURCES[1], 0, str(image), long_question, ["ckpt-a"], "instruct", True, 1.0, 4, 0)
    assert view.raw == [] and f"at most {MAX_QUESTION_CHARS:,}" in view.status and "2,399" in view.status
    assert not backend.cache._loaded  # refused before any model was loaded or run
    view = backend.comparison(SOURCES[0], 0, None, "", ["ckpt-a"], "instruct", True, 1.0, MAX_NEW_TOKENS + 1, 0)
    assert view.raw == [] and f"between 1 and {MAX_NEW_TOKENS}" in view.status
    view = backend.comparison(SOURCES[0], 0, None, "", ["ckpt-a"], "instruct", True, 1.0, "lots", 0)
    assert view.raw == [] and "whole number" in view.status
    many = [f"x{i}" for i in range(MAX_CHECKPOINTS + 1)]
    view = backend.comparison(SOURCES[0], 0, None, "", many, "instruct", True, 1.0, 4, 0)
    assert view.raw == [] and f"at most {MAX_CHECKPOINTS}" in view.status
    # a question at the limit is accepted
    assert len(upload_prompt(Image.open(image), "q" * MAX_QUESTION_CHARS, backend.task("instruct")).messages) == 1


def test_time_budget_skips_checkpoints_not_yet_started(folders):
    backend = DemoBackend([folders["a"], folders["b"]], task="shapes", data="synthetic:2", split="test", time_budget_s=0.0)
    view = backend.comparison(SOURCES[0], 0, None, "", ["ckpt-a", "ckpt-b"], "instruct", True, 1.0, 4, 0)
    assert view.raw[0]["error"] is None and view.raw[0]["completion"] is not None  # the first always runs
    assert view.raw[1]["error"].startswith("skipped: this comparison's time budget (0 s) was spent")


def test_checkpoint_is_demoed_at_its_own_saved_pixel_budget(folders, tmp_path, monkeypatch):
    """A checkpoint saved with a 56x56 budget sees the 112x112 example at 56x56 (the old fixed Qwen default
    of 1280 tokens would have kept 112x112), and the task scores with that budget."""
    small = tmp_path / "small-budget"
    shutil.copytree(folders["a"], small)
    config = json.loads((small / "preprocessor_config.json").read_text())
    config["size"] = {"shortest_edge": 3136, "longest_edge": 3136}
    (small / "preprocessor_config.json").write_text(json.dumps(config))
    backend = DemoBackend([str(small), folders["a"]], task="shapes", data="synthetic:2", split="test")
    seen = []
    for label in ("small-budget", "ckpt-a"):
        processor = backend.cache.get(backend.allow.resolve(label)).processor
        resize = processor.resize

        def spy(messages, resize=resize, label=label):
            out = resize(messages)
            seen.append((label, [item["image"].size for m in out if isinstance(m["content"], list) for item in m["content"] if item.get("type") == "image"]))
            return out

        monkeypatch.setattr(processor, "resize", spy)
    view = backend.comparison(SOURCES[0], 0, None, "", ["small-budget"], "instruct", True, 1.0, 4, 0)
    assert view.raw[0]["pixel_budget"] == [3136, 3136] and "3,136-3,136 px" in view.cards
    assert seen == [("small-budget", [(56, 56)])]
    budget = backend.task("instruct").image_budget
    assert (budget.min_pixels, budget.max_pixels, budget.factor) == (3136, 3136, 28)
    view = backend.comparison(SOURCES[0], 0, None, "", ["ckpt-a"], "instruct", True, 1.0, 4, 0)
    saved = json.loads((Path(folders["a"]) / "preprocessor_config.json").read_text())["size"]
    assert view.raw[0]["pixel_budget"] == [saved["shortest_edge"], saved["longest_edge"]] != [3136, 3136]
    assert seen[-1] == ("ckpt-a", [(112, 112)])


def test_upload_prompts_come_from_the_tasks_conversation(folders):
    """Golden prompts of a typed question: the instruct form is one user turn with the think/answer
    instruction; the base form is R1's system turn, the user turn and an opened "<think>", as the task trains."""
    from gpg_vl.parsing import R1_SYSTEM_PROMPT, THINK_ANSWER_INSTRUCTION

    backend = DemoBackend([folders["a"]], task="shapes", data="synthetic:2", split="test")
    image = Image.new("RGB", (40, 40))
    instruct = upload_prompt(image, "  What colour?  ", backend.task("instruct")).messages
    assert instruct == [{"role": "user", "content": [{"type": "image", "image": image},
                                                     {"type": "text", "text": f"What colour?\n{THINK_ANSWER_INSTRUCTION}"}]}]
    base = upload_prompt(image, "What colour?", backend.task("base")).messages
    assert base == [{"role": "system", "content": R1_SYSTEM_PROMPT},
                    {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What colour?"}]},
                    {"role": "assistant", "content": "<think>"}]
    with pytest.raises(UploadError, match="Type a question"):
        upload_prompt(image, "   ", backend.task("instruct"))


def test_task_defaults_to_the_runs_own(tmp_path):
    from gpg_vl_demo.app import run_task

    run = tmp_path / "run"
    run.mkdir()
    assert run_task([str(run)]) == "shapes"  # no config.yaml yet
    (run / "config.yaml").write_text("task:\n  name: cvbench\n")
    assert run_task([str(tmp_path / "missing"), str(run)]) == "cvbench"
    (run / "config.yaml").write_text("{ not yaml")
    assert run_task([str(run)], fallback="lisa") == "lisa"


def test_run_view_shows_the_controls_at_each_saved_checkpoint(tmp_path):
    """A run that logged eval.controls: the run view's text has, per saved checkpoint, each metric with its
    real, blind and shuffled values and the visual gain; a run without controls has no such table."""
    from gpg_vl_demo import runs
    from gpg_vl_demo.backend import DemoBackend

    rows = [{"step": 0, "eval/accuracy": 0.25, "eval/blind/accuracy": 0.25, "eval/shuffled/accuracy": 0.24,
             "eval/visual_gain/accuracy": 0.0},
            {"step": 50, "reward_mean": 1.2, "eval/accuracy": 0.9, "eval/blind/accuracy": 0.3,
             "eval/shuffled/accuracy": 0.28, "eval/visual_gain/accuracy": 0.6}]  # fmt: skip
    run = tmp_path / "run"
    (run / "checkpoint-50").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = runs.controls_table(rows, [50])
    assert "| checkpoint-50 | accuracy | 0.900 | 0.300 | 0.280 | +0.600 |" in table and "checkpoint-0" not in table
    assert runs.controls_table([{"step": 50, "eval/accuracy": 0.9}], [50]) == ""
    backend = DemoBackend([], [str(run)], task="shapes", data="synthetic:2", split="test")
    (label,) = backend.allow.run_choices()
    _, _, evals, text = backend.run_view(label)
    assert "| checkpoint-50 | accuracy | 0.900 | 0.300 | 0.280 | +0.600 |" in text
    assert {"eval/blind/accuracy", "eval/visual_gain/accuracy"} <= set(evals["metric"])  # curves carry them too
