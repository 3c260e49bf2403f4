"""`gpg-vl demo`: a local web page that runs several checkpoints side by side on one image and question.

Run:  gpg-vl demo --model runs/gpg/checkpoint-300 --model builtin:tiny-warm --task shapes
      gpg-vl demo --run runs/gpg            # its saved steps, its curves, and the rollout inspector tab
The server binds 127.0.0.1 unless --host says otherwise (--share opts into a public link) and loads only
the checkpoints named on the command line and their checkpoint-STEP subfolders. This file is the Gradio
layout, its wiring and the CLI checks; the work lives in `backend.py`, so tests drive it with or without a
browser.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import sys
from pathlib import Path

import gradio as gr

from .backend import MAX_NEW_TOKENS, SOURCES, DemoBackend
from .compare import CARDS_CSS
from .inputs import MAX_QUESTION_CHARS, MAX_UPLOAD_BYTES, MAX_UPLOAD_SIDE
from .inspector import INSPECTOR_CSS

# Requests waiting in a queue beyond this are refused ("queue full") instead of piling up behind a slow one.
MAX_QUEUED = 16
# Cheap page actions (browse examples, open a run, inspect a step) run this many at a time; they have their
# own queues, so they never wait behind a comparison, which runs alone (concurrency_limit=1).
LIGHT_CONCURRENCY = 4
_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")

# System fonts only: Gradio's default theme fetches Google Fonts, which an offline machine cannot reach.
THEME = gr.themes.Default(font=["system-ui", "Helvetica", "Arial", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument("--model", action="extend", nargs="+", default=[], metavar="PATH",
                        help="checkpoint folder, hub id or builtin:<preset> (repeat to compare); its checkpoint-STEP subfolders are offered too")
    parser.add_argument("--run", action="extend", nargs="+", default=[], metavar="RUN_FOLDER",
                        help="training run folder: pick among its checkpoint-STEP folders and see its metrics.jsonl curves")
    parser.add_argument("--task", default=None, help="task whose examples and rewards are used (default: the first --run's task, else shapes)")
    parser.add_argument("--data", default=None, help="examples to browse: hub id or local path (default: the task's eval data)")
    parser.add_argument("--split", default=None, help="split of --data (default: the task's eval split)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on, 1-65535 (default 7860)")
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link (off by default)")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def check_options(args: argparse.Namespace) -> str | None:
    """What is wrong with the command line, in one line; None when nothing is."""
    if not args.model and not args.run:
        return "give at least one --model PATH or --run RUN_FOLDER"
    if not 1 <= args.port <= 65535:
        return f"--port must be between 1 and 65535, got {args.port}"
    try:
        ipaddress.ip_address(args.host)
    except ValueError:
        if not _HOSTNAME.fullmatch(args.host):
            return f"--host must be an IP address or a host name, got {args.host!r}"
    for folder in args.run:
        if not Path(folder).expanduser().is_dir():
            return f"--run {folder}: no such folder"
    for model in args.model:
        # a path-like value must exist; anything else may be a hub id or builtin:<preset>
        if model.startswith((".", "/", "~")) and not Path(model).expanduser().exists():
            return f"--model {model}: no such folder"
    return None


def run_task(runs: list[str], fallback: str = "shapes") -> str:
    """The task the first of `runs` trained on (its config.yaml's task.name), else `fallback`."""
    import yaml

    for folder in runs:
        try:
            name = yaml.safe_load((Path(folder).expanduser() / "config.yaml").read_text())["task"]["name"]
        except (OSError, yaml.YAMLError, KeyError, TypeError):
            continue
        if isinstance(name, str) and name:
            return name
    return fallback


def run(args: argparse.Namespace) -> int:
    problem = check_options(args)
    if problem:
        print(f"gpg-vl demo: error: {problem}", file=sys.stderr)
        return 2
    if args.share or not _is_loopback(args.host):
        print(f"gpg-vl demo: warning: reachable beyond this machine ({'share link' if args.share else args.host}); "
              "anyone who can open it can run the listed checkpoints", file=sys.stderr)
    from gpg_vl.kit import build_builtin

    for model in args.model:
        build_builtin(model)  # a builtin:<preset> is built once here, so loading it later only reads a folder
    try:
        app = build_app(args.model, args.run, task=args.task or run_task(args.run), data=args.data, split=args.split)
    except (KeyError, TypeError, ValueError) as e:  # unknown task name or task options
        print(f"gpg-vl demo: error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    launch(app, host=args.host, port=args.port, share=args.share, block=True)
    return 0


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False, block: bool = True):
    """Serve `app` with the demo's limits (uploads over 10 MB refused by the server itself); returns Gradio's
    (app, local_url, share_url). `block=False` returns at once (tests), and `app.close()` stops it."""
    return app.queue(default_concurrency_limit=1, max_size=MAX_QUEUED).launch(
        server_name=host,
        server_port=port,
        share=share,
        prevent_thread_lock=not block,
        max_file_size=MAX_UPLOAD_BYTES,
        show_error=True,
        ssr_mode=False,
        quiet=not block,
        theme=THEME,
        css=CARDS_CSS + INSPECTOR_CSS,
    )


def build_app(
    models: list[str],
    runs: list[str] = (),
    task: str = "shapes",
    data: str | None = None,
    split: str | None = None,
    device: str | None = None,
) -> gr.Blocks:
    """The demo page over the checkpoints `models` and run folders `runs` (the only paths it may load)."""
    if device is None:
        from gpg_vl.modeling import inference_device

        device = str(inference_device())
    backend = DemoBackend(models, runs, task=task, data=data, split=split, device=device)
    have_examples = bool(backend.examples)
    model_choices = backend.allow.model_choices()
    run_choices = backend.allow.run_choices()
    first_run = run_choices[0] if run_choices else None
    run_steps, reward_df, eval_df, run_summary = backend.run_view(first_run)
    first_style = backend.styles[0]
    example_image, example_text = backend.example_view(0, first_style)
    first_steps, first_info = backend.inspector_steps(first_run)
    first_step_md, first_step_html = backend.inspector_view(first_run, first_steps[-1] if first_steps else None)

    with gr.Blocks(title="gpg-vl demo", analytics_enabled=False) as app:
        gr.Markdown(
            f"## gpg-vl demo\nTask **{backend.task_name}**, "
            + (f"{len(backend.examples)} examples ({backend.data}, split {backend.split})" if have_examples else "no examples loaded")
            + f", running on **{device}**. Each checkpoint gets the same prompt and seed."
        )
        with gr.Tabs():
            with gr.Tab("Compare checkpoints", id="compare"):
                if backend.data_error:
                    gr.Markdown(backend.data_error + "\n\nUse **Your image** below, or pass `--data` with a local copy.")
                with gr.Row():
                    with gr.Column(scale=5):
                        source = gr.Radio(list(SOURCES), value=SOURCES[0] if have_examples else SOURCES[1], label="Input")
                        with gr.Group(visible=have_examples) as example_group:
                            example_index = gr.Slider(0, max(len(backend.examples) - 1, 1), value=0, step=1, label="Example")
                        with gr.Group(visible=not have_examples) as upload_group:
                            upload = gr.File(label=f"Upload an image (at most {MAX_UPLOAD_BYTES // 2**20} MB, {MAX_UPLOAD_SIDE} px a side)", type="filepath")
                            question = gr.Textbox(label=f"Question (at most {MAX_QUESTION_CHARS:,} characters)", lines=2, max_length=MAX_QUESTION_CHARS,
                                              placeholder="What colour is the shape?", elem_id="question")
                        image = gr.Image(example_image, type="pil", format="png", label="Image (boxes: green = ground truth)",
                                         interactive=False, height=340, elem_id="input-image")
                        example_md = gr.Markdown(example_text if have_examples else "", label="Example", elem_id="example")
                    with gr.Column(scale=4):
                        checkpoints = gr.CheckboxGroup(model_choices, value=_default_models(model_choices),
                                                       label="Checkpoints (given on the command line)", elem_id="checkpoints")
                        with gr.Accordion("Training runs", open=True, visible=bool(run_choices)):
                            with gr.Row():
                                run = gr.Dropdown(run_choices, value=first_run, label="Run folder", scale=3)
                                refresh = gr.Button("Refresh (new steps)", size="sm", scale=1)
                            steps = gr.CheckboxGroup(run_steps, value=[], label="Saved steps to compare")
                            run_md = gr.Markdown(run_summary, label="Run summary")
                            reward_plot = gr.LinePlot(reward_df, x="step", y="value", color="metric", title="Training reward", label="Training reward", height=200)
                            eval_plot = gr.LinePlot(eval_df, x="step", y="value", color="metric", title="Held-out metrics", label="Held-out metrics", height=200)
                        style = gr.Radio(backend.styles, value=first_style, label="Prompt style")
                        with gr.Row():
                            greedy = gr.Checkbox(True, label="Greedy", elem_id="greedy")
                            seed = gr.Number(0, precision=0, label="Seed")
                        temperature = gr.Slider(0.05, 2.0, value=1.0, step=0.05, label="Temperature", interactive=False, elem_id="temperature")
                        max_new_tokens = gr.Slider(1, MAX_NEW_TOKENS, value=256, step=1, label="Max new tokens", elem_id="max-new-tokens")
                        compare_button = gr.Button("Compare", variant="primary", elem_id="compare-btn")
                status = gr.Markdown(label="Status", elem_id="status")
                table = gr.Dataframe(label="Rewards and time per checkpoint", interactive=False, elem_id="scores")
                cards = gr.HTML(label="Completions", elem_id="cards")
                with gr.Accordion("Raw results (JSON)", open=False):
                    raw = gr.JSON(label="Raw results")

            with gr.Tab("Rollout inspector", id="inspector"):
                gr.Markdown("What the policy sampled during training (`samples.jsonl`): each logged group's prompt, its G "
                            "completions with reward components and advantage, whether the group was valid, and every "
                            "token coloured by the probability the sampling policy gave it. Needs no checkpoint.")
                with gr.Row():
                    inspect_run = gr.Dropdown(run_choices, value=first_run, label="Run folder", scale=3, elem_id="inspect-run")
                    inspect_step = gr.Dropdown(first_steps, value=first_steps[-1] if first_steps else None, label="Logged step",
                                               scale=2, elem_id="inspect-step")
                    inspect_refresh = gr.Button("Refresh (new steps)", size="sm", scale=1)
                inspect_info = gr.Markdown(first_info, elem_id="inspect-info")
                inspect_step_md = gr.Markdown(first_step_md, elem_id="inspect-step-md")
                inspect_html = gr.HTML(first_step_html, elem_id="inspector")

        # ---- events: each handler is a thin shell over a DemoBackend method ----
        def show_example(index, style_name):
            return backend.example_view(index, style_name)

        def show_source(choice, index, style_name, upload_path):
            on_example = choice == SOURCES[0]
            shown, text = backend.example_view(index, style_name) if on_example else (None, "")
            if not on_example and upload_path:
                shown = show_upload(upload_path)
            return gr.update(visible=on_example), gr.update(visible=not on_example), shown, text

        def show_upload(upload_path):
            shown, warnings = backend.upload_view(upload_path)
            for w in warnings:
                gr.Warning(w)
            return shown

        def open_run(run_label):
            step_labels, rewards, evals, text = backend.run_view(run_label)
            return gr.update(choices=step_labels, value=[]), rewards, evals, text

        def run_comparison(choice, index, upload_path, question_text, model_labels, step_labels, style_name,
                           greedy_on, temp, max_tokens, seed_value, progress=gr.Progress()):
            view = backend.comparison(
                choice, index, upload_path, question_text, list(model_labels or []) + list(step_labels or []),
                style_name, greedy_on, temp, max_tokens, seed_value,
                progress=lambda fraction, desc: progress(fraction, desc=desc),
            )
            for w in view.warnings:
                gr.Warning(w)
            return (view.image if view.image is not None else gr.update()), view.table, view.cards, view.raw, view.status

        def open_inspector(run_label):
            logged, info = backend.inspector_steps(run_label)
            latest = logged[-1] if logged else None
            step_md, step_body = backend.inspector_view(run_label, latest)
            return gr.update(choices=logged, value=latest), info, step_md, step_body

        def show_step(run_label, step):
            return backend.inspector_view(run_label, step)

        private = dict(api_visibility="private")
        light = dict(concurrency_limit=LIGHT_CONCURRENCY)
        example_index.change(show_example, [example_index, style], [image, example_md], api_name="example", **light)
        style.change(show_example, [example_index, style], [image, example_md], **private, **light)
        source.change(show_source, [source, example_index, style, upload], [example_group, upload_group, image, example_md], **private, **light)
        upload.upload(show_upload, upload, image, **private, **light)
        upload.clear(lambda: None, None, image, **private)
        greedy.change(lambda g: gr.update(interactive=not g), greedy, temperature, **private)
        run.change(open_run, run, [steps, reward_plot, eval_plot, run_md], api_name="open_run", **light)
        refresh.click(open_run, run, [steps, reward_plot, eval_plot, run_md], **private, **light)
        compare_button.click(
            run_comparison,
            [source, example_index, upload, question, checkpoints, steps, style, greedy, temperature, max_new_tokens, seed],
            [image, table, cards, raw, status],
            api_name="compare",
            concurrency_limit=1,
        )
        inspect_outputs = [inspect_step, inspect_info, inspect_step_md, inspect_html]
        inspect_run.change(open_inspector, inspect_run, inspect_outputs, api_name="inspect_run", **light)
        inspect_refresh.click(open_inspector, inspect_run, inspect_outputs, **private, **light)
        inspect_step.change(show_step, [inspect_run, inspect_step], [inspect_step_md, inspect_html], api_name="inspect_step", **light)
    app.backend = backend  # for tests and for whoever embeds the demo
    return app


def _default_models(choices: list[str]) -> list[str]:
    """Pre-select the models themselves, not every saved step under them (that could be dozens)."""
    top = [c for c in choices if "/checkpoint-" not in c]
    return top or choices[-1:]
