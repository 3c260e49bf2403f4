"""The rollout inspector: a training run's `samples.jsonl`, one logged step at a time, as HTML.

Per group: every prompt image and the text, whether the group was valid (rewards not all equal, so it
carries a gradient), and per completion its reward, reward components, advantage and tokens coloured by the
log-probability the sampling policy gave them; for a grounding task, its box drawn beside the true one. Completions are model output, hence untrusted: every string
is HTML-escaped. Files written before the trainer logged tokens (only prompt/completions/rewards) are shown
with what they hold.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from .boxes import draw_boxes
from .inputs import UploadError, read_upload

SAMPLES_FILE = "samples.jsonl"
THUMB_SIDE = 224  # images are shown at this size at most (small ones are enlarged with sharp pixels)
MAX_TOKENS_SHOWN = 2048  # per completion; a longer one is cut with a note, to keep the page light
_STEP_PREFIX = re.compile(rb'\{"step":\s*(\d+)')  # RunLogger writes the step first on every line


@dataclass
class SampledCompletion:
    """One of a group's G completions as logged."""

    text: str
    reward: float | None = None
    components: dict[str, float] = field(default_factory=dict)
    advantage: float | None = None  # None in files logged before advantages were
    tokens: list[str] | None = None  # the sampled tokens, one decoded string each
    logprobs: list[float] | None = None  # [len(tokens)] log-prob of each under the policy that sampled it
    finish_reason: str | None = None  # "stop" or "length"
    box: list[float] | None = None  # grounding: the box it answered, in original-image pixels


@dataclass
class SampledGroup:
    """One prompt of a logged step and its G completions."""

    step: int
    prompt: str
    image: str | None  # path relative to the run folder (the first image)
    valid: bool | None  # as logged; None in old files
    completions: list[SampledCompletion]
    images: list[str] = field(default_factory=list)  # every prompt image's path (several: a multi-image prompt)
    truth_box: list[float] | None = None  # grounding: the true box, in original-image pixels

    @property
    def valid_from_rewards(self) -> bool:
        """What `valid` means, recomputed: the rewards are not all equal (for files without the flag)."""
        rewards = {c.reward for c in self.completions if c.reward is not None}
        return len(rewards) > 1


# ---- reading ----------------------------------------------------------------------------------------


def _index(path: Path) -> list[tuple[int, int]]:
    """(step, byte offset) of every line, read from each line's start only (files grow to 100s of MB)."""
    found, offset = [], 0
    with open(path, "rb") as f:
        for line in f:
            match = _STEP_PREFIX.match(line)
            if match and line.endswith(b"\n"):  # the trainer may still be writing the last line
                found.append((int(match.group(1)), offset))
            offset += len(line)
    return found


def logged_steps(run_folder: str | Path) -> list[int]:
    """The steps with samples in a run, oldest first; [] when it has no samples.jsonl."""
    path = Path(run_folder) / SAMPLES_FILE
    return sorted({step for step, _ in _index(path)}) if path.is_file() else []


def read_step(run_folder: str | Path, step: int) -> list[SampledGroup]:
    """The groups logged at `step`. When a resumed run logged the step twice, the last block wins."""
    path = Path(run_folder) / SAMPLES_FILE
    if not path.is_file():
        return []
    offsets, previous = [], None
    for s, offset in _index(path):
        if s == step:
            if previous != step:
                offsets = []  # a new block of this step: a rerun after resume replaces the earlier one
            offsets.append(offset)
        previous = s
    groups = []
    with open(path, "rb") as f:
        for offset in offsets:
            f.seek(offset)
            try:
                row = json.loads(f.readline())
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            group = _group(row, step)
            if group is not None:
                groups.append(group)
    return groups


def _number(value) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _list(row: dict, key: str, n: int) -> list:
    """row[key] when it is a list of n items, else n Nones (a missing or malformed field of an old file)."""
    value = row.get(key)
    return value if isinstance(value, list) and len(value) == n else [None] * n


def _group(row: dict, step: int) -> SampledGroup | None:
    """A logged line as a group; None when it has no list of completions."""
    if not isinstance(row, dict) or not isinstance(row.get("completions"), list):
        return None
    texts = [str(t) for t in row["completions"]]
    n = len(texts)
    completions = []
    for text, reward, parts, advantage, tokens, logprobs, finish, box in zip(
        texts, _list(row, "rewards", n), _list(row, "components", n), _list(row, "advantages", n),
        _list(row, "tokens", n), _list(row, "logprobs", n), _list(row, "finish_reasons", n), _list(row, "boxes", n),
    ):
        good_tokens = isinstance(tokens, list) and isinstance(logprobs, list) and len(tokens) == len(logprobs)
        completions.append(SampledCompletion(
            text=text,
            reward=_number(reward),
            components={str(k): v for k, v in (parts or {}).items() if _number(v) is not None} if isinstance(parts, dict) else {},
            advantage=_number(advantage),
            tokens=[str(t) for t in tokens] if good_tokens else None,
            logprobs=[_number(v) for v in logprobs] if good_tokens else None,
            finish_reason=finish if isinstance(finish, str) else None,
            box=_box(box),
        ))
    valid = row.get("valid")
    image = row.get("image")
    image = image if isinstance(image, str) else None
    images = [p for p in row["images"] if isinstance(p, str)] if isinstance(row.get("images"), list) else [image] if image else []
    return SampledGroup(step, str(row.get("prompt", "")), image, valid if isinstance(valid, bool) else None, completions,
                        images, _box(row.get("truth_box")))  # fmt: skip


def _box(value) -> list[float] | None:
    """A logged box: four finite numbers, else None."""
    numbers = [_number(v) for v in value] if isinstance(value, list) and len(value) == 4 else []
    return numbers if len(numbers) == 4 and None not in numbers else None


def group_image(run_folder: str | Path, relative: str | None):
    """The group's prompt image, or None. The path comes from a file, so it must stay inside the run folder,
    and the image passes the upload checks (size, sides) before it is decoded."""
    if not relative:
        return None
    root = Path(run_folder).resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        return None
    try:
        return read_upload(path)
    except UploadError:
        return None


# ---- HTML -------------------------------------------------------------------------------------------


def token_colour(logprob: float | None) -> str:
    """Background of a token: red where the sampler gave it a low probability, green where a high one."""
    if logprob is None:
        return "hsl(0, 0%, 88%)"
    p = math.exp(min(logprob, 0.0))
    return f"hsl({round(120 * p)}, 75%, 80%)"


def tokens_html(tokens: list[str], logprobs: list[float | None]) -> str:
    """The tokens as escaped spans coloured by probability; hovering shows the log-prob."""
    spans = []
    for token, logprob in list(zip(tokens, logprobs))[:MAX_TOKENS_SHOWN]:
        shown = html.escape(token).replace("\n", "\u21b5\n") or "\u2205"  # an empty piece still gets a cell
        tip = "log-prob n/a" if logprob is None else f"log-prob {logprob:.3f}, p {math.exp(min(logprob, 0.0)):.3f}"
        spans.append(f'<span class="gpg-tok" style="background:{token_colour(logprob)}" title="{html.escape(tip, quote=True)}">{shown}</span>')
    if len(tokens) > MAX_TOKENS_SHOWN:
        spans.append(f"<i> ... {len(tokens) - MAX_TOKENS_SHOWN} more tokens</i>")
    return "".join(spans)


def _image_html(image, alt: str = "prompt image", css: str = "gpg-img") -> str:
    if image is None:
        return '<div class="gpg-noimg">no image logged</div>'
    image = image.copy()
    image.thumbnail((THUMB_SIDE, THUMB_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img class="{css}" alt="{html.escape(alt, quote=True)}" src="data:image/png;base64,{data}">'


def _box_html(image, c: SampledCompletion, truth: list[float] | None) -> str:
    """The completion's box (red) beside the true one (green) on the prompt image, with its IoU."""
    iou = c.components.get("iou")
    label = "answer" if iou is None else f"IoU {iou:.2f}"
    if c.box is None:
        return f'<div class="gpg-nobox">no box ({html.escape(label)})</div>'
    drawn = draw_boxes(image, [(label, tuple(c.box))], tuple(truth) if truth else None)
    return _image_html(drawn, f"box with {label}", "gpg-boxes")


def _fmt(value: float | None, sign: bool = False) -> str:
    if value is None:
        return "&ndash;"
    return f"{value:+.3f}" if sign else f"{value:g}"


def _validity(group: SampledGroup) -> str:
    if group.valid is None:
        derived = group.valid_from_rewards
        return f'<span class="{"gpg-valid" if derived else "gpg-invalid"}">{"valid" if derived else "not valid"} (from rewards; flag not logged)</span>'
    if group.valid:
        return '<span class="gpg-valid">valid: rewards differ, the group carries a gradient</span>'
    return '<span class="gpg-invalid">not valid: all rewards equal, zero advantage, no gradient</span>'


def _completion_row(k: int, c: SampledCompletion, boxes: str = "") -> str:
    parts = ", ".join(f"{html.escape(name)} {value:g}" for name, value in c.components.items()) or "&ndash;"
    if c.tokens is not None:
        body = tokens_html(c.tokens, c.logprobs or [None] * len(c.tokens))
    else:  # an old file: plain text, no per-token figures
        body = html.escape(c.text)
    note = " <i>(hit max tokens)</i>" if c.finish_reason == "length" else ""
    return (
        f"<tr><td>{k + 1}</td><td><b>{_fmt(c.reward)}</b></td><td>{parts}</td><td>{_fmt(c.advantage, sign=True)}</td>"
        f'<td>{boxes}<div class="gpg-text">{body}</div>{note}</td></tr>'
    )


def group_html(index: int, group: SampledGroup, images) -> str:
    """One group: its images, prompt, validity, then a row per completion (with its box, for grounding)."""
    images = images if isinstance(images, list) else [images]  # one image, or each of a multi-image prompt
    grounding = group.truth_box is not None or any(c.box is not None for c in group.completions)
    draw_on = images[0] if grounding and images and images[0] is not None else None
    rows = "".join(_completion_row(k, c, _box_html(draw_on, c, group.truth_box) if draw_on else "") for k, c in enumerate(group.completions))
    shown = "".join(_image_html(image, f"prompt image {k + 1}") for k, image in enumerate(images)) or _image_html(None)
    return (
        f'<div class="gpg-group"><div class="gpg-head">{shown}<div>'
        f"<h3>Group {index + 1} &middot; {len(group.completions)} completions</h3><p>{_validity(group)}</p>"
        f'<pre class="gpg-prompt">{html.escape(group.prompt)}</pre></div></div>'
        '<table class="gpg-rollouts"><thead><tr><th>#</th><th>reward</th><th>components</th><th>advantage</th>'
        f"<th>completion (tokens coloured by sampled probability)</th></tr></thead><tbody>{rows}</tbody></table></div>"
    )


LEGEND = (
    '<p class="gpg-legend">Token colour: probability the sampling policy gave the token &mdash; '
    + "".join(f'<span class="gpg-tok" style="background:{token_colour(math.log(p))}">p {p:g}</span> ' for p in (0.05, 0.25, 0.5, 0.75, 1.0))
    + "(hover a token for its log-prob).</p>"
)


def step_html(run_folder: str | Path, step: int) -> str:
    """The whole logged step: a legend, then every group."""
    groups = read_step(run_folder, step)
    if not groups:
        return f"<p>No samples logged at step {int(step)}.</p>"
    body = "".join(group_html(i, g, [group_image(run_folder, p) for p in g.images]) for i, g in enumerate(groups))
    legacy = any(c.tokens is None for g in groups for c in g.completions)
    note = "<p><i>This file predates per-token logging: completions are shown as plain text.</i></p>" if legacy else ""
    return f'<div class="gpg-inspector">{LEGEND}{note}{body}</div>'


INSPECTOR_CSS = """
.gpg-inspector .gpg-group { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 10px 12px; margin-bottom: 14px; }
.gpg-inspector .gpg-head { display: flex; gap: 14px; align-items: flex-start; }
.gpg-inspector .gpg-head h3 { margin: 0 0 4px 0; }
.gpg-inspector .gpg-img { width: 168px; image-rendering: pixelated; border-radius: 4px; }
.gpg-inspector .gpg-boxes { width: 140px; float: left; margin-right: 8px; border-radius: 4px; }
.gpg-inspector .gpg-nobox { float: left; width: 140px; margin-right: 8px; color: #b25b00; font-size: 0.85em; }
.gpg-inspector .gpg-prompt { white-space: pre-wrap; word-break: break-word; margin: 4px 0; max-height: 160px; overflow-y: auto; }
.gpg-inspector .gpg-valid { color: #13803a; font-weight: 600; }
.gpg-inspector .gpg-invalid { color: #b25b00; font-weight: 600; }
.gpg-inspector table.gpg-rollouts { width: 100%; border-collapse: collapse; margin-top: 8px; }
.gpg-inspector table.gpg-rollouts td, .gpg-inspector table.gpg-rollouts th { border-top: 1px solid var(--border-color-primary); padding: 3px 6px; vertical-align: top; text-align: left; }
.gpg-inspector .gpg-text { white-space: pre-wrap; word-break: break-word; font-family: ui-monospace, monospace; font-size: 0.9em; line-height: 1.7; }
.gpg-tok { border-radius: 3px; padding: 1px 0; margin-right: 1px; color: #111; white-space: pre-wrap; }
"""
