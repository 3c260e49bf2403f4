"""The whole run configuration as typed dataclasses, filled from YAML then `dotted.key=value` overrides.

One source of truth: the fields and `Config.finalize`, the one validation pass, live in gpg_vl/config_fields.py,
the rule language in gpg_vl/config_rules.py; this module loads YAML and overrides into them (every mistake is
one line naming the file or override that set the key, before any model or data loads) and generates the
field reference of docs/config.md. Everything is importable from here.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from gpg_vl.config_fields import (
    ATTN_IMPLEMENTATIONS, DTYPES, LR_SCHEDULES, OPTIMIZERS, AlgorithmConfig, CheckpointConfig, Config, EvalConfig, LoggingConfig,
    LoraConfig, ModelConfig, OptimConfig, RolloutConfig, TaskConfig, TrainConfig,
)
from gpg_vl.config_rules import Rule, _rules, option
from gpg_vl.errors import ConfigError  # lives in gpg_vl.errors so raising it needs no config import

__all__ = [
    "ATTN_IMPLEMENTATIONS", "DTYPES", "LR_SCHEDULES", "OPTIMIZERS", "AlgorithmConfig", "CheckpointConfig", "Config", "ConfigError",
    "EvalConfig", "LoggingConfig", "LoraConfig", "ModelConfig", "OptimConfig", "Rule", "RolloutConfig", "TaskConfig", "TrainConfig",
    "config_reference", "field_docs", "load_config", "option", "parse_override", "write_reference", "_rules",
]


# ---- loading ------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting only the safe cases (int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: '{key}' must be {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
    elif tp is tuple or origin is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(value)
    elif tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    else:
        return value
    raise ConfigError(f"{where}: '{key}' must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _apply(obj: Any, data: dict, prefix: str, where: str, sources: dict[str, str]) -> None:
    """Set fields from `data`, recording in `sources` where each dotted key was set (for error messages)."""
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"{where}: unknown key '{dotted}'; valid keys here: {', '.join(sorted(names))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: '{dotted}' is a section and needs a mapping, got {value!r}")
            _apply(current, value, f"{dotted}.", where, sources)
        else:
            setattr(obj, key, _coerce(value, hints[key], dotted, where))
            sources[dotted] = where


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value read as YAML: 3 is int, 0.5 float, true bool, null None, [1, 2] list)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like dotted.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):
        try:
            value = float(raw)  # YAML 1.1 reads 1e-3 as a string
        except ValueError:
            value = raw
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file (if any) <- `dotted.key=value` overrides, then `finalize()`.

    Every error is one line that starts with where the faulty key was set: the file, or the override."""
    cfg, sources = Config(), {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        _apply(cfg, data, "", str(path), sources)
    for text in overrides:
        key, value = parse_override(text)
        nested: Any = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        _apply(cfg, nested, "", f"command-line override '{text}'", sources)
    try:
        return cfg.finalize()
    except ConfigError as e:
        where = sources.get(e.key or "") or path or "defaults"
        raise ConfigError(f"{where}: {e}", e.key) from None


def field_docs(section: type) -> dict[str, str]:
    """Field name -> docstring, read from the source (used by `--help` and the README)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(section))
    docs, body = {}, tree.body[0].body
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = nxt.value.value
    return docs


# ---- reference page -----------------------------------------------------------------------------

REFERENCE_BEGIN = "<!-- BEGIN field reference: generated by `python -m gpg_vl.config docs/config.md`; do not edit -->"
REFERENCE_END = "<!-- END field reference -->"


def config_reference() -> str:
    """Markdown tables of every field: key, type, default, allowed values, docstring (docs/config.md)."""
    out = []
    for section, cls, default in _sections(Config(), ""):
        docs, hints = field_docs(cls), typing.get_type_hints(cls)
        out += [f"### `{section}`", "", "| key | type | default | allowed | description |", "| --- | --- | --- | --- | --- |"]
        for f in dataclasses.fields(cls):
            value = getattr(default, f.name)
            if dataclasses.is_dataclass(value):
                allowed, shown = "section", f"see `{section}.{f.name}`"
            else:
                rule = f.metadata.get("rule")
                allowed = rule.allowed() if rule else "any"
                if rule and hints[f.name] is float or (rule and rule.items):
                    allowed = f"finite, {allowed}"
                shown = f"`{yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}`"
            doc = " ".join(docs.get(f.name, "").split()).replace("|", "\\|")
            kind = "section" if allowed == "section" else _type_text(hints[f.name])
            out.append(f"| `{section}.{f.name}` | {kind} | {shown} | {allowed.replace('|', '&#124;')} | {doc} |")
        out.append("")
    return "\n".join(out)


def _type_text(tp: Any) -> str:
    args = typing.get_args(tp)
    if type(None) in args:
        return " or ".join(_type_text(a) for a in args if a is not type(None)) + " or null"
    return getattr(tp, "__name__", str(tp))


def _sections(obj: Any, prefix: str) -> Iterator[tuple[str, type, Any]]:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield f"{prefix}{f.name}", type(value), value
            yield from _sections(value, f"{prefix}{f.name}.")


def write_reference(page: str | Path) -> bool:
    """Replace the generated region of `page` with `config_reference()`; True when the page changed."""
    page = Path(page)
    text = page.read_text()
    head, rest = text.split(REFERENCE_BEGIN, 1)
    _, tail = rest.split(REFERENCE_END, 1)
    new = f"{head}{REFERENCE_BEGIN}\n\n{config_reference()}\n{REFERENCE_END}{tail}"
    page.write_text(new)
    return new != text


if __name__ == "__main__":
    import sys

    for page in sys.argv[1:] or ["docs/config.md"]:
        print(f"{page}: {'updated' if write_reference(page) else 'already up to date'}")
