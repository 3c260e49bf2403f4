"""Where a run's numbers go: metrics.jsonl (always), TensorBoard (default), W&B (opt-in), a tqdm bar,
and samples.jsonl with the prompt image saved beside it. Only the main process writes.

On resume every log we write is cut back to the checkpoint's step, so a crashed run's extra steps never
appear twice; W&B reopens the same run (its id is kept in the run folder) and is not cut back
(docs/reliability.md says what it shows).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tqdm.auto import tqdm

from gpg_vl.atomic import atomic_write_text

SAMPLE_IMAGE = re.compile(r"step-(\d+)-\d+(?:-\d+)?\.png")  # the names `samples()` gives images
WANDB_RUN_ID = "wandb/gpg-vl-run-id"  # in the run folder: the W&B run a resume reopens


class RunLogger:
    def __init__(self, cfg, output_dir: Path, is_main: bool, total_steps: int, initial_step: int = 0, resume_line: dict | None = None):
        """`initial_step`: the checkpoint's step on resume (0 for a fresh run); `resume_line`: that step's
        metrics line as saved in the checkpoint, written back if the log lost it."""
        self.cfg, self.dir, self.is_main = cfg, Path(output_dir), is_main
        self.tb = self.wandb = self.bar = None
        if not is_main:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if initial_step:
            self._forget_after(initial_step, resume_line)
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides the events a crashed run wrote after the checkpoint from TensorBoard's readers
            self.tb = SummaryWriter(str(self.dir / "tb"), purge_step=initial_step + 1 if initial_step else None)
        if cfg.logging.wandb:
            self.wandb = open_wandb_run(cfg, self.dir, resuming=bool(initial_step))
        if cfg.logging.progress_bar:
            self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True)

    def _forget_after(self, step: int, resume_line: dict | None) -> None:
        """On resume, drop lines and sample images logged after the checkpoint (a crashed run may have gone
        further) and a torn last line; put back the checkpoint step's line if the crash came before it."""
        trim_jsonl(self.dir / "metrics.jsonl", step, resume_line)
        trim_jsonl(self.dir / "samples.jsonl", step)
        images = self.dir / "samples"
        if images.is_dir():
            for image in images.iterdir():
                match = SAMPLE_IMAGE.fullmatch(image.name)
                if match and int(match.group(1)) > step:
                    image.unlink()

    def log(self, step: int, metrics: dict) -> None:
        """Append one JSON line per step; mirror to TensorBoard / W&B every `log_every` steps."""
        if not self.is_main:
            return
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if step % max(1, self.cfg.logging.log_every) == 0:
            numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            if self.tb:
                for k, v in numbers.items():
                    self.tb.add_scalar(k, v, step)
            if self.wandb:
                self.wandb.log(numbers, step=step)
        if self.bar and step > 0:  # step 0 is the evaluation before training (eval.at_start)
            self.bar.update(1)
            keys = ("loss", "reward_mean", "valid_fraction", "eval/accuracy")
            self.bar.set_postfix({k.split("/")[-1]: f"{metrics[k]:.3g}" for k in keys if isinstance(metrics.get(k), (int, float))})

    def samples(self, step: int, rows: list[dict], images: list[list]) -> None:
        """Write prompts, completions and rewards; each prompt's images as samples/step-S-i.png (the first,
        its path in `image`) and step-S-i-k.png (image k > 0, all paths in `images` when there are several)."""
        if not self.is_main:
            return
        folder = self.dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "samples.jsonl", "a") as f:
            for i, (row, prompt_images) in enumerate(zip(rows, images)):
                names = []
                for k, image in enumerate(prompt_images):
                    names.append(f"step-{step:06d}-{i}.png" if k == 0 else f"step-{step:06d}-{i}-{k}.png")
                    image.save(folder / names[-1])
                if names:
                    row = {**row, "image": f"samples/{names[0]}"}
                if len(names) > 1:
                    row["images"] = [f"samples/{name}" for name in names]
                f.write(json.dumps({"step": step, **row}) + "\n")

    def write(self, text: str) -> None:
        if self.is_main:
            if self.bar:
                self.bar.write(text)
            else:
                print(text, flush=True)  # a run killed right after must not lose the line in a buffer

    def close(self) -> None:
        for closer in (self.bar, self.tb):
            if closer:
                closer.close()
        if self.wandb:
            self.wandb.finish()


def open_wandb_run(cfg, folder: Path, resuming: bool):
    """The run folder's W&B run: a fresh run starts one and keeps its id in WANDB_RUN_ID; a resume reopens
    that run (`resume="allow"`), so it logs steps S+1 on under the same id.

    Not rewound: W&B's rewind (`resume_from="<id>?_step=S"`) needs the server and is a private preview, so
    steps the crashed run logged after S stay in W&B (docs/reliability.md: which values it shows)."""
    import wandb  # optional dependency: pip install gpg-vl[wandb]

    id_file = folder / WANDB_RUN_ID
    run_id = id_file.read_text().strip() if resuming and id_file.is_file() else None
    run = wandb.init(project=cfg.logging.wandb_project, dir=str(folder), config=cfg.to_dict(), id=run_id,
                     resume="allow" if run_id else None)  # fmt: skip
    if run_id is None:
        id_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(id_file, run.id + "\n")
    return run


def trim_jsonl(path: Path, step: int, last_line: dict | None = None) -> None:
    """Keep the lines of a per-step JSONL log with `step` <= `step`; a torn (unparseable) last line is what
    a kill mid-write leaves and is dropped. `last_line` is appended when no line for `step` is left."""
    from gpg_vl.checkpoint import CheckpointError, atomic_write_text

    if not path.exists() and last_line is None:
        return
    lines = path.read_text().splitlines() if path.exists() else []
    kept, seen = [], False
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            if number == len(lines):
                break  # torn by a crash mid-write
            raise CheckpointError(f"{path}:{number} is not a JSON object with a step; fix or delete that line to resume") from None
        if row_step <= step:
            kept.append(line)
            seen = seen or row_step == step
    if last_line is not None and not seen:
        kept.append(json.dumps({"step": step, **{k: v for k, v in last_line.items() if k != "step"}}))
    text = "".join(line + "\n" for line in kept)
    if not path.exists() or text != path.read_text():
        atomic_write_text(path, text)
