"""Reading example records from a hub id or a local file/folder, and turning image fields into PIL images.

Tasks call `read_records` so every task accepts the same kinds of path: a hub dataset id, a local
parquet/JSONL/JSON file, or a folder of them (or a `save_to_disk` folder). Offline, a hub id fails with a
message that says how to point at local files instead.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

from PIL import Image

_LOCAL_SUFFIXES = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv", ".arrow": "arrow"}
# Qwen2-VL's smart_resize refuses images longer than 200 times their width (or wider than 200 times their
# height); caught when the image is read, so the error names the data row, not a frame in the processor.
MAX_ASPECT_RATIO = 200


class DataError(ValueError):
    """A dataset that cannot be found or read, or an example that lacks what the task needs."""


def read_records(path: str, split: str = "train") -> list[dict]:
    """All rows of `path` (hub id, local file, or folder) as a list of dicts.

    For local JSON files holding one top-level list (Visual-RFT style), that list is returned as is.
    """
    local = Path(path).expanduser()
    if local.exists():
        return _read_local(local, split)
    if path.startswith((".", "/", "~")) or path.endswith(tuple(_LOCAL_SUFFIXES)):
        raise DataError(f"dataset file or folder not found: {path}")
    return _read_hub(path, split)


def _read_local(path: Path, split: str) -> list[dict]:
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            import datasets

            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = _pick_split(ds, split, str(path))
            return list(_undecoded(ds))
        files = sorted(p for p in path.rglob("*") if p.suffix in _LOCAL_SUFFIXES and split in p.name)
        files = files or sorted(p for p in path.rglob("*") if p.suffix in _LOCAL_SUFFIXES)
        if not files:
            raise DataError(f"{path}: no .parquet/.jsonl/.json/.csv files found")
        return [row for f in files for row in _read_local(f, split)]
    if path.suffix in (".json", ".jsonl"):
        text = read_utf8(path)
        if path.suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError:
                data = None  # JSON lines with a .json suffix
            if isinstance(data, list):
                return data
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON: {e}") from None
        return rows
    if path.suffix not in _LOCAL_SUFFIXES:
        raise DataError(f"{path}: unsupported file type {path.suffix!r} (use parquet, jsonl, json or csv)")
    import datasets

    return list(_undecoded(datasets.load_dataset(_LOCAL_SUFFIXES[path.suffix], data_files=str(path), split="train")))


def read_utf8(path: Path) -> str:
    """The file's text; a DataError naming the line of the first byte that is not UTF-8."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}); re-save the file as UTF-8") from None


def _undecoded(ds):
    """Keep image columns as {"bytes", "path"} so rows are cheap; `to_pil` decodes one when a prompt needs it."""
    import datasets

    for name, feature in ds.features.items():
        if isinstance(feature, datasets.Image):
            ds = ds.cast_column(name, datasets.Image(decode=False))
    return ds


def _pick_split(ds, split: str, where: str):
    if split not in ds:
        raise DataError(f"{where}: no split {split!r}; available: {', '.join(ds)}")
    return ds[split]


def _read_hub(repo_id: str, split: str) -> list[dict]:
    import datasets

    from gpg_vl import hub

    try:
        if not hub.reachable(repo_id, "dataset") and not hub.is_cached(repo_id, "dataset"):
            raise ConnectionError("the hub cannot be reached and the dataset is not in the local cache")
        return list(_undecoded(datasets.load_dataset(repo_id, split=split)))
    except Exception as e:  # offline machines raise several different errors here
        offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")
        raise DataError(
            f"could not load dataset {repo_id!r} (split {split!r}) from the hub{' (offline mode)' if offline else ''}: "
            f"{type(e).__name__}: {str(e)[:300]}\n"
            "Download it where a hub is reachable (e.g. `huggingface-cli download --repo-type dataset "
            f"{repo_id} --local-dir DIR`) and pass the local file or folder instead "
            "(task.train_data=DIR / task.eval_data=DIR, or --data DIR for eval)."
        ) from None


def to_pil(value: Any, base_dir: str | Path | None = None, where: str = "image") -> Image.Image:
    """A PIL RGB image from what datasets store: PIL, raw bytes, {"bytes":..,"path":..}, or a file path.

    Relative paths are resolved against `base_dir` (the folder of the file that named them).
    """
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        elif isinstance(value, dict) and value.get("bytes"):
            image = Image.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, dict) and value.get("path"):
            return to_pil(value["path"], base_dir, where)
        elif isinstance(value, (str, os.PathLike)):
            path = Path(value).expanduser()
            if not path.is_absolute() and base_dir is not None:
                path = Path(base_dir) / path
            if not path.is_file():
                raise DataError(f"{where}: image file not found: {path}")
            image = Image.open(path)
        else:
            raise DataError(f"{where}: cannot read an image from a {type(value).__name__}")
        _check_shape(image.size, where)  # from the header, before decoding the pixels
        image.load()
    except DataError:
        raise
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError on corrupt files
        raise DataError(f"{where}: unreadable image ({type(e).__name__}: {e})") from None
    return image.convert("RGB")


def _check_shape(size: tuple[int, int], where: str) -> None:
    width, height = size
    if min(width, height) < 1 or max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise DataError(
            f"{where}: image is {width}x{height}; Qwen2-VL takes images at most {MAX_ASPECT_RATIO} times longer "
            "than wide (crop or pad it)"
        )


def data_folder(path: str) -> str | None:
    """The folder relative image paths are resolved against: the data file's folder (None for a hub id)."""
    local = Path(path).expanduser()
    if local.is_file():
        return str(local.parent)
    return str(local) if local.is_dir() else None


def resolve_image_ref(value: Any, base_dir: str | None, where: str) -> Any:
    """An image reference for `to_pil`: a path made absolute and checked to exist, or bytes/dict/PIL as is."""
    if isinstance(value, dict) and not value.get("bytes") and value.get("path"):
        value = value["path"]
    if isinstance(value, str):
        path = Path(value).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        if not path.is_file():
            raise DataError(f"{where}: image file not found: {path}")
        return str(path)
    if isinstance(value, (bytes, bytearray, dict, Image.Image)):
        return value
    raise DataError(f"{where}: cannot read an image from a {type(value).__name__}")


SYNTHETIC = "synthetic"


def synthetic_spec(path: str | None, split: str, default_size: int = 1000) -> tuple[int, int] | None:
    """For `synthetic` or `synthetic:N`, the (size, seed) of the generated split; None for real data.

    The seed depends on the split name only, so `train` and `test` never share examples and every run
    sees the same ones.
    """
    if path is None or not (path == SYNTHETIC or path.startswith(SYNTHETIC + ":")):
        return None
    size = default_size
    if ":" in path:
        text = path.split(":", 1)[1]
        if not text.isdigit() or int(text) < 1:
            raise DataError(f"{path!r}: the size after 'synthetic:' must be a positive integer")
        size = int(text)
    import zlib

    return size, zlib.crc32(split.encode()) % (2**31)
