"""Where a run's numbers go: metrics.jsonl (always), TensorBoard (default), W&B (opt-in), a tqdm bar,
and samples.jsonl with the prompt image saved beside it. Only the main process writes.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm


class RunLogger:
    def __init__(self, cfg, output_dir: Path, is_main: bool, total_steps: int, initial_step: int = 0):
        self.cfg, self.dir, self.is_main = cfg, Path(output_dir), is_main
        self.tb = self.wandb = self.bar = None
        if not is_main:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if initial_step:
            self._forget_after(initial_step)
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.dir / "tb"))
        if cfg.logging.wandb:
            import wandb  # optional dependency: pip install gpg-vl[wandb]

            self.wandb = wandb.init(project=cfg.logging.wandb_project, dir=str(self.dir), config=cfg.to_dict())
        if cfg.logging.progress_bar:
            self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True)

    def _forget_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint (a crashed run may have gone further)."""
        from gpg_vl.checkpoint import atomic_write_text

        path = self.dir / "metrics.jsonl"
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
            atomic_write_text(path, "".join(line + "\n" for line in kept))

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
        if self.bar:
            self.bar.update(1)
            keys = ("loss", "reward_mean", "valid_fraction", "eval/accuracy")
            self.bar.set_postfix({k.split("/")[-1]: f"{metrics[k]:.3g}" for k in keys if isinstance(metrics.get(k), (int, float))})

    def samples(self, step: int, rows: list[dict], images: list) -> None:
        """Write prompts, completions and rewards; the first image of each prompt as samples/step-S-i.png."""
        if not self.is_main:
            return
        folder = self.dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "samples.jsonl", "a") as f:
            for i, (row, image) in enumerate(zip(rows, images)):
                if image is not None:
                    name = f"step-{step:06d}-{i}.png"
                    image.save(folder / name)
                    row = {**row, "image": f"samples/{name}"}
                f.write(json.dumps({"step": step, **row}) + "\n")

    def write(self, text: str) -> None:
        if self.is_main:
            (self.bar.write if self.bar else print)(text)

    def close(self) -> None:
        for closer in (self.bar, self.tb):
            if closer:
                closer.close()
        if self.wandb:
            self.wandb.finish()
