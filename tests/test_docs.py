"""The documentation stays true: README.md and docs/*.md link only to files (and headings) that exist,
every `gpg-vl train` command they show in a ```bash block resolves its configuration (`--print-config`,
exit 0, no model loaded), every other `gpg-vl VERB` command parses, and docs/README.md indexes every page.
Fast: nothing is trained.

A failure names the file and line of the command or link, so the fix is in the doc (or in the code it
describes). Placeholders the docs use for the reader's own paths are handled as the reader would:
`model.name_or_path=DIR` becomes a built-in model, and a plugin file the page defines in a ```python block
that opens with `# path/to/file.py` is written out and used in its place.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pytest

from gpg_vl.cli import VERBS, build_parser, main

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]

# A value the reader replaces with their own: a bare capitalised word (DIR, OUT), or a path under /path/to,
# /models/, /data/. For `model.name_or_path` a built-in model stands in; other values are never read by
# --print-config (it loads no model and no data), so they stay as written.
PLACEHOLDER = re.compile(r"^[A-Z][A-Z_]*$|/path/to|^/models/|^/data/")
STAND_IN_MODEL = "builtin:tiny"
# Lines the reader cannot run as written: shell variables, <angle placeholders>, elided arguments.
UNRUNNABLE = re.compile(r"\$|<[^>\s]+[^>]*>|\.\.\.")
SHELL_STOPS = {"&&", "||", "|", ";", ">", ">>", "2>&1", "&"}


def rel(path: Path) -> str:
    """`path` as written from the repository root (absolute when outside it)."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


# ---- (a) links -------------------------------------------------------------------------------------------

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
MD_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_LINK = re.compile(r"<(?:img|a|source)\b[^>]*?\b(?:src|href)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)


def blank_code(text: str) -> str:
    """The text with code blocks and inline code replaced by spaces (a link shown as code is not a link);
    newlines are kept so line numbers still match the file."""

    def blank(m: re.Match) -> str:
        return re.sub(r"[^\n]", " ", m.group(0))

    return INLINE_CODE.sub(blank, FENCE.sub(blank, text))


def relative_links(page: Path) -> list[tuple[int, str]]:
    """(line, target) of every relative link and image in `page`; web links and pure #anchors left out."""
    text = blank_code(page.read_text())
    found = []
    for pattern in (MD_LINK, HTML_LINK):
        for m in pattern.finditer(text):
            target = m.group(1).strip()
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith(("#", "//")):
                continue  # http(s):, mailto:, an anchor in the same page
            found.append((text.count("\n", 0, m.start()) + 1, target))
    return sorted(found)


def test_link_finder_sees_links_and_images_but_not_code(tmp_path):
    # the invariant below is only as good as the scanner: it must find both kinds and skip code
    page = tmp_path / "p.md"
    page.write_text(
        "See [training](training.md#loop) and ![c](../x/c.png \"t\") or <img src=\"a.png\">.\n"
        "`[not](a-link.md)` [web](https://example.com) [here](#top)\n```bash\n[x](nope.md)\n```\n"
    )
    assert relative_links(page) == [(1, "../x/c.png"), (1, "a.png"), (1, "training.md#loop")]


def heading_anchors(page: Path) -> set[str]:
    """The #anchors GitHub gives the headings of `page`: lower case, punctuation dropped, spaces to hyphens,
    a repeated heading suffixed -1, -2, ..."""
    anchors: set[str] = set()
    for m in re.finditer(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", FENCE.sub("", page.read_text()), re.MULTILINE):
        text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1)).replace("`", "")  # links -> their text
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


def test_heading_anchors_follow_githubs_rule(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# A user's `algorithm.valid_on`\n## What writes to `samples.jsonl`\n## Tests\n## Tests\n"
                    "```bash\n# not a heading\n```\n")
    assert heading_anchors(page) == {"a-users-algorithmvalid_on", "what-writes-to-samplesjsonl", "tests", "tests-1"}


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_relative_link_and_image_points_to_a_file(page):
    broken = []
    for line, target in relative_links(page):
        path, _, anchor = unquote(target.split("?", 1)[0]).partition("#")
        file = page.parent / path
        if not file.exists():
            broken.append(f"{rel(page)}:{line}: {target} -> no such file {rel(file.resolve())}")
        elif anchor and file.suffix == ".md" and anchor not in heading_anchors(file):
            broken.append(f"{rel(page)}:{line}: {target} -> {rel(file.resolve())} has no heading #{anchor}")
    assert not broken, "broken links:\n" + "\n".join(broken)


# ---- (b) and (c) commands --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    page: Path
    line: int
    text: str  # as written (continuations joined)
    argv: tuple[str, ...]  # from the verb on

    def __str__(self) -> str:
        return f"{rel(self.page)}:{self.line}: {self.text}"


BASH_BLOCK = re.compile(r"^```(?:bash|sh|shell)[ \t]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def bash_lines(page: Path) -> list[tuple[int, str]]:
    """(line number, command) in the ```bash blocks of `page`, backslash continuations joined."""
    text = page.read_text()
    out = []
    for block in BASH_BLOCK.finditer(text):
        first = text.count("\n", 0, block.start(1)) + 1
        pending, start = "", None
        for offset, line in enumerate(block.group(1).splitlines()):
            start = first + offset if start is None else start
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            out.append((start, (pending + line).strip()))
            pending, start = "", None
    return out


def gpg_vl_argv(line: str) -> tuple[str, ...] | None:
    """The arguments after `gpg-vl` (or `-m gpg_vl.cli`), up to any shell operator; None if not a gpg-vl command."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:
        return None
    for i, token in enumerate(tokens):
        if token == "gpg-vl" or token.endswith("/gpg-vl"):
            rest = tokens[i + 1 :]
            break
        if token == "-m" and tokens[i + 1 : i + 2] == ["gpg_vl.cli"]:
            rest = tokens[i + 2 :]
            break
    else:
        return None
    argv = []
    for token in rest:
        if token in SHELL_STOPS or token.startswith((">", "2>")):
            break
        argv.append(token)
    return tuple(argv) if argv and argv[0] in VERBS else None


def documented_commands() -> list[Command]:
    commands = []
    for page in PAGES:
        for line, text in bash_lines(page):
            argv = gpg_vl_argv(text)
            if argv is not None:
                commands.append(Command(page, line, text, argv))
    return commands


COMMANDS = documented_commands()
RUNNABLE = [c for c in COMMANDS if not UNRUNNABLE.search(" ".join(c.argv))]  # comments may say anything
TRAIN = [c for c in RUNNABLE if c.argv[0] == "train" and not {"-h", "--help"} & set(c.argv)]
OTHER = [c for c in RUNNABLE if c not in TRAIN]


def test_the_docs_show_commands_and_the_finder_reads_them():
    # without this, an extraction bug would turn the two command tests below into empty parametrizations
    assert len(TRAIN) >= 5 and {c.argv[0] for c in OTHER} >= {"eval", "demo"}
    assert gpg_vl_argv("accelerate launch --config_file x.yaml -m gpg_vl.cli train --task cvbench a.b=1  # c") == (
        "train", "--task", "cvbench", "a.b=1")
    assert gpg_vl_argv("OMP_NUM_THREADS=1 .venv/bin/gpg-vl tasks > out.txt") == ("tasks",)
    assert gpg_vl_argv("pip install 'gpg-vl[vllm]'") is None


def defined_files(page: Path) -> dict[str, str]:
    """Files a page defines in full: ```python blocks whose first line is `# path/to/file.py`."""
    blocks = re.findall(r"^```python[ \t]*\n# ([\w./-]+\.py)[ \t]*\n(.*?)^```", page.read_text(), re.MULTILINE | re.DOTALL)
    return {name: f"# {name}\n{body}" for name, body in blocks}


def runnable_argv(command: Command, tmp_path: Path) -> list[str]:
    """The command's argv with the reader's placeholders filled in (see the module docstring)."""
    files = defined_files(command.page)
    argv = []
    for arg in command.argv:
        key, eq, value = arg.partition("=")
        if eq and key == "model.name_or_path" and PLACEHOLDER.search(value):
            arg = f"{key}={STAND_IN_MODEL}"
        elif eq and key in ("task.name", "algorithm.plugin"):
            file = value.split(":", 1)[0] if key == "task.name" else value
            if file.endswith(".py") and not (ROOT / file).exists():
                assert file in files, f"{command}\n  names {file}, which neither exists nor is defined on that page"
                (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
                (tmp_path / file).write_text(files[file])
                arg = f"{key}={tmp_path / file}{value[len(file):]}"
        argv.append(arg)
    return argv


@pytest.fixture
def isolated_registries(monkeypatch):
    """A plugin a doc defines registers algorithms and imports modules; forget both afterwards, so the
    other tests (which register the same example names) see the registries as they were."""
    from gpg_vl import algorithms

    tables = [algorithms.ALGORITHMS]
    saved = [dict(t) for t in tables]
    modules = set(sys.modules)
    monkeypatch.chdir(ROOT)  # the docs' relative paths (configs/...) are written from the repository root
    yield
    for table, before in zip(tables, saved):
        table.clear()
        table.update(before)
    for name in set(sys.modules) - modules:
        if name.startswith("gpg_vl_user_task_"):
            del sys.modules[name]


@pytest.mark.parametrize("command", TRAIN, ids=lambda c: f"{rel(c.page)}:{c.line}")
def test_documented_train_command_resolves_its_config(command, tmp_path, capsys, isolated_registries):
    argv = runnable_argv(command, tmp_path) + ["--print-config"]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, f"{command}\n  gpg-vl {' '.join(argv)} exited {code}: {err.strip()}"
    assert out.startswith("model:"), f"{command}\n  --print-config printed no config: {out[:200]!r}"


@pytest.mark.parametrize("command", OTHER, ids=lambda c: f"{rel(c.page)}:{c.line}")
def test_documented_command_parses(command, capsys):
    argv = list(command.argv)
    try:
        build_parser(argv[0]).parse_args(argv)
    except SystemExit as e:
        err = capsys.readouterr().err.strip().splitlines()
        if e.code == 0 and {"-h", "--help"} & set(argv):
            return  # --help prints and exits 0
        pytest.fail(f"{command}\n  does not parse: {err[-1] if err else e}")


# ---- the index -------------------------------------------------------------------------------------------


def test_docs_index_lists_every_page_and_only_pages_that_exist():
    index = DOCS / "README.md"
    assert index.is_file(), "docs/README.md, the index of the docs pages, is missing"
    listed = {target.split("#")[0] for _, target in relative_links(index) if target.split("#")[0].endswith(".md")}
    pages = {p.name for p in DOCS.glob("*.md")} - {"README.md"}
    assert not pages - listed, f"docs/README.md does not list: {', '.join(sorted(pages - listed))}"
    assert not listed - pages - {"../README.md"}, f"docs/README.md lists missing pages: {', '.join(sorted(listed - pages))}"
