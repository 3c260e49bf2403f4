"""Few-shot fine-grained classification as Visual-RFT and the GPG paper run it (Flowers102, Pets37, FGVC-Aircraft,
Cars196, 4-shot): the model names the class inside <answer> tags.

Training rows are Visual-RFT's (`image`, `problem`, `solution` = "<answer>class name</answer>"); evaluation
also reads an image folder with a label list and a class-name list (layout in `load`). Accuracy is a
normalised exact match by default; `match="contains"` is the paper's looser rule (both in
`gpg_vl.parsing.answer_matches`). `synthetic[:N]` draws shape-and-colour classes offline.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpg_vl.data import DataError, read_records, read_utf8, resolve_image_ref, synthetic_spec, to_pil
from gpg_vl.parsing import MATCH_RULES, THINK_ANSWER_INSTRUCTION, answer_matches, extract_answer, format_ok
from gpg_vl.task import RewardOutput, Task
from gpg_vl_tasks.classification_synthetic import make_synthetic_examples

# dataset option -> (hub id of the 4-shot training set, question); questions as in Visual-RFT's
# classification/Qwen2_VL_classification_infere.py, the think/answer instruction follows on a new line.
DATASETS = {
    "flowers": (
        "laolao77/ViRFT_CLS_flower_4_shot",
        "This is an image containing a plant. Please identify the species of the plant based on the image.",
    ),
    "pets": (
        "laolao77/ViRFT_CLS_pets37_4shot",
        "This is an image containing a pet. Please identify the species of the pet based on the image.",
    ),
    "aircraft": (
        "laolao77/ViRFT_CLS_fgvc_aircraft_4_shot",
        "This is an image containing an aircraft. Please identify the model of the aircraft based on the image.",
    ),
    "cars": (
        "laolao77/ViRFT_CLS_car196_4shot",
        "This is an image containing a car. Please identify the model of the car based on the image.",
    ),
}


class ClassificationTask(Task):
    name = "classification"
    description = "Few-shot fine-grained classification (Visual-RFT 4-shot Flowers102, Pets37, FGVC-Aircraft, Cars196)."
    default_train_data = DATASETS["flowers"][0]
    default_eval_data = None  # no hub test split: Visual-RFT evaluates on each dataset's full test set
    missing_data_hint = (
        "Visual-RFT evaluates on each dataset's full test set, which is not on the hub: pass an image folder "
        "(see ClassificationTask.load) or 'synthetic'"
    )

    def __init__(
        self,
        dataset: str = "flowers",
        match: str = "exact",
        prompt_style: str = "instruct",
        use_row_problem: bool = False,
        synthetic_image_size: int = 112,
        synthetic_easy: bool = False,
        **options: Any,
    ) -> None:
        """dataset: flowers | pets | aircraft | cars (training hub id and question). match: exact | contains.
        prompt_style: instruct | base. use_row_problem: show a row's own `problem` text verbatim, as
        Visual-RFT's training script does, instead of the dataset question + instruction.
        synthetic_image_size: side in pixels of the offline twin's images. synthetic_easy: the twin draws four
        classes of one colour each instead of twelve (benchmarks/twins/classification.yaml)."""
        super().__init__(prompt_style=prompt_style, **options)
        if dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {', '.join(DATASETS)}; got {dataset!r}")
        if match not in MATCH_RULES:
            raise ValueError(f"match must be 'exact' or 'contains', got {match!r}")
        self.dataset, self.match = dataset, match
        self.use_row_problem = bool(use_row_problem)
        self.synthetic_image_size = int(synthetic_image_size)
        self.synthetic_easy = bool(synthetic_easy)
        self.default_train_data, self.question = DATASETS[dataset]

    # ---- data ------------------------------------------------------------------------------------
    def load(self, path: str | None = None, split: str = "train") -> list[dict]:
        """Examples from a hub id, a local parquet/JSONL/JSON file or folder of Visual-RFT rows, an image
        folder, or `synthetic[:N]`.

        Image-folder layout (evaluation; a folder holding `classnames.txt` is read this way):
            DIR/classnames.txt  one class name a line; line k (from 0) names label k
            DIR/labels.txt      one image a line: `<image path relative to DIR> <label k>`
            or DIR/labels.pth   Visual-RFT's val_data/<dataset>.pth (a list of {path: {"label": k}});
                                only the file name of each path is used, looked up in DIR/images/
        Visual-RFT's val_data/<dataset>.txt is exactly such a classnames.txt.
        """
        path = self.data_path(path, split)
        spec = synthetic_spec(path, split)
        if spec is not None:
            return make_synthetic_examples(*spec, image_size=self.synthetic_image_size, split=split, easy=self.synthetic_easy)
        local = Path(path).expanduser()
        if local.is_dir() and (local / "classnames.txt").is_file():
            return self._read_image_folder(local)
        base_dir = (local if local.is_dir() else local.parent) if local.exists() else None
        examples = []
        for i, row in enumerate(read_records(path, split)):
            where = f"{path} (split {split!r}) row {i}"
            if not isinstance(row, dict) or row.get("image") is None or not isinstance(row.get("solution"), str):
                raise DataError(f"{where}: needs 'image' and a 'solution' string (Visual-RFT schema)")
            label = extract_answer(row["solution"])
            label = (label if label is not None else row["solution"]).strip()
            if not label:
                raise DataError(f"{where}: empty class name in 'solution' {row['solution']!r}")
            image = row["image"]
            if isinstance(image, str):
                image = resolve_image_ref(image, base_dir, where)
            problem = row.get("problem")
            examples.append(
                {"origin": where, "id": f"{split}-{i}", "image": image, "label": label, "question": self.question,
                 "problem": problem if isinstance(problem, str) else None, "dataset": self.dataset}
            )
        if not examples:
            raise DataError(f"{path} (split {split!r}): no rows")
        return examples

    def _read_image_folder(self, folder: Path) -> list[dict]:
        names_file = folder / "classnames.txt"
        names = [line.strip() for line in read_utf8(names_file).splitlines() if line.strip()]
        if (folder / "labels.txt").is_file():
            items = _read_label_txt(folder / "labels.txt", folder, len(names))
        elif (folder / "labels.pth").is_file():
            items = _read_label_pth(folder / "labels.pth", folder / "images", len(names))
        else:
            raise DataError(f"{folder}: has classnames.txt but no labels.txt or labels.pth")
        return [
            {"origin": where, "id": os.path.relpath(image, folder), "image": image, "label": names[k],
             "question": self.question, "problem": None, "dataset": self.dataset}
            for image, k, where in items
        ]

    # ---- prompt ----------------------------------------------------------------------------------
    def messages(self, example: dict) -> list[dict]:
        """Instruct: image, question, think/answer instruction. Base: R1 system turn, user turn, "<think>"."""
        image = to_pil(example["image"], where=self.origin(example))
        problem = example.get("problem") if self.use_row_problem else None
        if problem:
            text = problem.strip()
        elif self.prompt_style == "instruct":
            text = f"{example['question']}\n{THINK_ANSWER_INSTRUCTION}"
        else:
            text = example["question"]
        return self.conversation([image], text)

    # ---- reward and metrics ------------------------------------------------------------------------
    def score(self, completion: str, example: dict) -> RewardOutput:
        text = self.full_completion(completion)
        fmt = float(format_ok(text))
        acc = float(answer_matches(extract_answer(text), example["label"], self.match))
        return RewardOutput(fmt + acc, {"format": fmt, "accuracy": acc})

    def metrics(self, examples: Sequence[dict], completions: Sequence[str]) -> dict[str, float]:
        """`accuracy` under this task's `match` rule, and `format` (share of well-formed completions)."""
        if len(examples) != len(completions):
            raise ValueError(f"{len(examples)} examples but {len(completions)} completions")
        scores = [self.score(c, e).components for e, c in zip(examples, completions)]
        n = max(len(scores), 1)
        return {
            "accuracy": sum(s["accuracy"] for s in scores) / n,
            "format": sum(s["format"] for s in scores) / n,
        }

    def reference_answer(self, example: dict) -> str | None:
        return example["label"]

    def record_fields(self, example: dict) -> dict[str, Any]:
        return {k: example[k] for k in ("id", "label", "dataset") if k in example}


# ---- label lists ---------------------------------------------------------------------------------
def _read_label_txt(file: Path, folder: Path, n_classes: int) -> list[tuple[str, int, str]]:
    items = []
    for n, line in enumerate(read_utf8(file).splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)  # image paths may contain spaces; the label is the last field
        where = f"{file}:{n}"
        if len(parts) != 2 or not parts[1].isdigit() or int(parts[1]) >= n_classes:
            raise DataError(f"{where}: expected '<image path> <label 0..{n_classes - 1}>', got {line!r}")
        items.append((resolve_image_ref(parts[0], folder, where), int(parts[1]), where))
    return items


def _read_label_pth(file: Path, image_dir: Path, n_classes: int) -> list[tuple[str, int, str]]:
    import torch  # only this layout needs it; weights_only keeps a pickle from running code

    try:
        data = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DataError(f"{file}: unreadable label list ({type(e).__name__}: {e})") from None
    items = []
    for n, entry in enumerate(data if isinstance(data, list) else []):
        for path, info in (entry.items() if isinstance(entry, dict) else []):
            where = f"{file} item {n}"
            label = int(info["label"]) if isinstance(info, dict) and "label" in info else -1
            if not 0 <= label < n_classes:
                raise DataError(f"{where}: label {label} outside 0..{n_classes - 1}")
            items.append((resolve_image_ref(Path(str(path)).name, image_dir, where), label, where))
    if not items:
        raise DataError(f"{file}: expected a list of {{image path: {{'label': k}}}} entries")
    return items
