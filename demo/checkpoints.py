"""Which checkpoints the demo may load, and the cache that loads each one once.

The allow-list is the demo's file-system boundary: the page only ever sends back a label it was offered,
and a label resolves to a path given on the command line or to one of its `checkpoint-STEP` subfolders.
Anything else is refused, so no path typed into the page reaches `from_pretrained`.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from gpg_vl.config import ModelConfig, RolloutConfig
from gpg_vl.modeling import load_policy
from gpg_vl.rollout import make_engine

_STEP_DIR = re.compile(r"checkpoint-(\d+)")


class UnknownCheckpoint(KeyError):
    """A label the page did not offer (e.g. a path typed into a request): refused."""

    def __str__(self) -> str:
        return f"{self.args[0]!r} is not one of the checkpoints given on the command line"


@dataclass(frozen=True)
class Checkpoint:
    label: str  # what the page shows and sends back
    path: str  # what load_policy gets: a command-line path, or one of its checkpoint-* subfolders


def saved_steps(folder: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the `checkpoint-STEP` subfolders of `folder`, oldest first; [] if not a folder."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = _STEP_DIR.fullmatch(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def _short_labels(given: list[str]) -> dict[str, str]:
    """A readable label per command-line path: its last component, or the path itself when two clash."""
    short = {}
    for g in given:
        local = Path(g).expanduser()
        short[g] = local.name if local.exists() and local.name else g
    clashes = {s for s in short.values() if list(short.values()).count(s) > 1}
    return {g: (g if s in clashes else s) for g, s in short.items()}


class CheckpointAllowList:
    """Labels the page may offer, each mapped to a path from the command line (re-scanned on every call,
    so a run still training shows its newest `checkpoint-STEP` without a restart)."""

    def __init__(self, models: list[str], runs: list[str] = ()):
        self.models, self.runs = list(models), list(runs)
        self._labels = _short_labels(self.models + self.runs)

    def model_choices(self) -> list[str]:
        """Labels of the `--model` paths that are models, then of their saved steps."""
        labels = []
        for given in self.models:
            steps = saved_steps(given)
            # a folder with only checkpoint-* inside is a run, not a model; anything else is offered (a
            # broken folder then fails to load with a message in the page, not silently vanishes)
            if not steps or (Path(given).expanduser() / "config.json").exists():
                labels.append(self._labels[given])
            labels += [f"{self._labels[given]}/checkpoint-{step}" for step, _ in steps]
        return labels

    def run_choices(self) -> list[str]:
        """Labels of the `--run` folders."""
        return [self._labels[r] for r in self.runs]

    def run_folder(self, run_label: str) -> Path:
        """The folder of a `--run` label (UnknownCheckpoint for anything else)."""
        for given in self.runs:
            if self._labels[given] == run_label:
                return Path(given).expanduser()
        raise UnknownCheckpoint(run_label)

    def run_steps(self, run_label: str) -> list[str]:
        """Labels of the saved steps of one run, oldest first."""
        return [f"{run_label}/checkpoint-{step}" for step, _ in saved_steps(self.run_folder(run_label))]

    def resolve(self, label: str) -> Checkpoint:
        """The checkpoint behind an offered label; UnknownCheckpoint for anything the page was not offered."""
        for given in self.models + self.runs:
            base = self._labels[given]
            if label == base and given in self.models:
                return Checkpoint(label, given)
            if label.startswith(base + "/checkpoint-"):
                for step, path in saved_steps(given):
                    if label == f"{base}/checkpoint-{step}":
                        return Checkpoint(label, str(path))
        raise UnknownCheckpoint(label)


@dataclass
class LoadedPolicy:
    model: object
    processor: object  # a VLProcessor; its min_pixels/max_pixels are the budget this checkpoint sees
    engine: object  # a RolloutEngine over `model`
    load_seconds: float

    @property
    def pixel_budget(self) -> tuple[int, int]:
        """(min_pixels, max_pixels) every image is resized into before this checkpoint sees it."""
        return int(self.processor.min_pixels), int(self.processor.max_pixels)


class PolicyCache:
    """Loads each checkpoint once and keeps the `capacity` most recently used (older ones are dropped, so a
    long session over many steps of a 7B run does not fill the GPU).

    Each checkpoint sees images at its OWN pixel budget, the one saved with its image processor (the
    loaded processor's `min_pixels`/`max_pixels`): a model trained on 112x112 images is demoed on them,
    not on Qwen's 1280-token default. `min_pixels`/`max_pixels` given here override every checkpoint's.
    """

    def __init__(self, device: str = "cpu", capacity: int = 4, min_pixels: int | None = None, max_pixels: int | None = None):
        self.device, self.capacity = device, max(1, capacity)
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self._loaded: OrderedDict[str, LoadedPolicy] = OrderedDict()
        self._lock = threading.Lock()

    def model_config(self, path: str) -> ModelConfig:
        return ModelConfig(name_or_path=path, min_pixels=self.min_pixels, max_pixels=self.max_pixels)

    def get(self, checkpoint: Checkpoint) -> LoadedPolicy:
        """The loaded policy of `checkpoint`; raises ModelLoadError (or what from_pretrained raises) on failure."""
        with self._lock:
            if checkpoint.path in self._loaded:
                self._loaded.move_to_end(checkpoint.path)
                return self._loaded[checkpoint.path]
            start = time.perf_counter()
            model_cfg = self.model_config(checkpoint.path)
            model, processor = load_policy(model_cfg, self.device)
            model.eval()
            engine = make_engine("hf", model, processor, RolloutConfig(batch_size=1), model_cfg)
            loaded = LoadedPolicy(model, processor, engine, time.perf_counter() - start)
            self._loaded[checkpoint.path] = loaded
            while len(self._loaded) > self.capacity:
                self._loaded.popitem(last=False)
            return loaded

    def __contains__(self, checkpoint: Checkpoint) -> bool:
        return checkpoint.path in self._loaded
