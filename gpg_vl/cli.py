"""The `gpg-vl` command: train, eval, demo, tasks, make-tiny.

`main(argv) -> int` so tests drive the CLI in-process. Each verb's arguments and work live in the module
that owns it (`trainer`, `evaluate`, `gpg_vl_demo.app`); this file only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

VERBS = {
    "train": ("gpg_vl.trainer", "Train a policy with GPG (or GRPO / Dr.GRPO) on a task."),
    "eval": ("gpg_vl.evaluate", "Evaluate one or more checkpoints on a task with its published metrics."),
    "demo": ("gpg_vl_demo.app", "Open a local web page that compares checkpoints side by side."),
    "tasks": ("gpg_vl.cli", "List the registered tasks."),
    "make-tiny": ("gpg_vl.cli", "Build a random-weight Qwen2-VL / Qwen2.5-VL / Qwen3-VL folder, or a builtin preset, from the offline kit."),
}


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `verb`'s module is imported for its options, so `gpg-vl --help` stays fast."""
    parser = argparse.ArgumentParser(
        prog="gpg-vl",
        description="Group Policy Gradient (GPG) reinforcement learning for vision-language models.",
        epilog="Run `gpg-vl VERB --help` for the options of a verb.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name, (module, help_text) in VERBS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name != verb:
            continue
        if module == __name__:
            _own_arguments(p, name)
        else:
            _module(module).add_arguments(p, name)
    return parser


def _module(name: str):
    return importlib.import_module(name)


def _own_arguments(p: argparse.ArgumentParser, verb: str) -> None:
    if verb == "make-tiny":
        from gpg_vl.tiny import ARCHES, PRESETS

        from gpg_vl.builtin import BUILTINS

        p.add_argument("out", nargs="?", help="folder to write the model to (not with --builtin)")
        p.add_argument("--builtin", choices=list(BUILTINS), metavar="PRESET",
                       help=f"build builtin:PRESET into the cache instead (warm presets run their format warm-up): {', '.join(BUILTINS)}")
        p.add_argument("--arch", choices=ARCHES, default="qwen2_vl", help="model family (default: qwen2_vl)")
        p.add_argument("--preset", choices=list(PRESETS), default="tiny", help="sizes: tiny (~0.8M params), small-20m (benchmarks), 2b-shape (Qwen2-VL-2B widths and vocabulary, 2+2 layers)")
        p.add_argument("--seed", type=int, default=0, help="weight and tokenizer seed (same seed, same folder)")


def run_tasks(args) -> int:
    from gpg_vl.registry import available_tasks, get_task_class

    for name, target in available_tasks().items():
        try:
            description = get_task_class(name).description
        except Exception as e:  # a broken third-party plugin must not hide the others
            description = f"(failed to load {target}: {type(e).__name__}: {e})"
        print(f"{name:16s} {description}")
    return 0


def run_make_tiny(args) -> int:
    if (args.out is None) == (args.builtin is None):
        print("gpg-vl make-tiny: error: give either OUT (a folder to write) or --builtin PRESET", file=sys.stderr)
        return 2
    if args.builtin:
        from gpg_vl.kit import build_builtin

        print(f"builtin:{args.builtin} is in {build_builtin('builtin:' + args.builtin)}")
        return 0
    from gpg_vl.tiny import make_tiny

    path = make_tiny(args.out, arch=args.arch, preset=args.preset, seed=args.seed)
    print(f"wrote {args.arch} ({args.preset}) to {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv[0] if argv and argv[0] in VERBS else None).parse_args(argv)
    module, _ = VERBS[args.verb]
    if module == __name__:
        return {"tasks": run_tasks, "make-tiny": run_make_tiny}[args.verb](args)
    from gpg_vl.checkpoint import CheckpointError
    from gpg_vl.config import ConfigError
    from gpg_vl.data import DataError
    from gpg_vl.guard import NonFiniteError
    from gpg_vl.mathverify import MathVerifyUnavailable
    from gpg_vl.modeling import ModelLoadError
    from gpg_vl.rollout.base import PromptParityError

    caller_group = _group_open()  # a group the caller opened before this call is the caller's to end
    try:
        code = int(_module(module).run(args) or 0)
    except (CheckpointError, ConfigError, DataError, MathVerifyUnavailable, ModelLoadError, PromptParityError, FileNotFoundError) as e:
        print(f"gpg-vl {args.verb}: error: {e}", file=sys.stderr)
        code = 2
    except NonFiniteError as e:  # the run diverged: exit 3, apart from bad input (2)
        print(f"gpg-vl {args.verb}: error: {e}", file=sys.stderr)
        code = 3
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if not caller_group:
        end_process_group()
    return code


def _group_open() -> bool:
    dist = sys.modules.get("torch.distributed")  # a process that never imported torch opened no group
    return dist is not None and dist.is_available() and dist.is_initialized()


def end_process_group() -> None:
    """Destroy the process group of a multi-process launch (torchrun / `accelerate launch`: WORLD_SIZE > 1)
    before the interpreter exits. Without it gloo's worker threads outlive Python's finalisation and a rank
    may die with `terminate called without an active exception` (SIGABRT) after a run that succeeded: 12 of
    20 two-rank gloo runs here (pytorch#190489). `main` calls it after success and after the errors it
    reports (the loop raises those on every rank together: `fail_together`, the non-finite guard), never on
    an interrupt or an unexpected error, where another rank may still sit in a collective, nor when the
    caller had opened the group. A one-process run's group is left alone: vLLM's in-process engine opens
    one and destroys it itself when it shuts down (after `main`, from a finaliser)."""
    if _group_open() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.modules["torch.distributed"].destroy_process_group()


def entry() -> None:
    """The `gpg-vl` command and `python -m gpg_vl.cli`: `main`, then the process ends.

    A rank of a multi-process launch whose run succeeded (its process group destroyed by `main`) ends without
    the interpreter's finalisation: Python's exit handlers run (logging, W&B), stdout and stderr are flushed,
    then `os._exit`. Destroying the group was not enough: a finished rank of the two-rank ZeRO-3 test still died
    at exit with `terminate called without an active exception` in 4 of about 55 runs here (pytorch#190489;
    which C++ thread is left was not found), and the run's files are closed by then (the trainer closes its
    logger; metrics and checkpoints are written whole). `main` itself returns, for callers in the same process."""
    code = main()
    if code == 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _group_open():
        import atexit

        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    sys.exit(code)


if __name__ == "__main__":
    entry()
