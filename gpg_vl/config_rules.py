"""The rule language of the config: each field's allowed values (`option(8, ge=2)`, choices, sequences),
checked by `Config.finalize` and written into docs/config.md. Nothing here knows the fields themselves.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any


# ---- ranges and choices, declared on each field ---------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """The allowed values of one field. Floats must always be finite; None passes where the type allows it.

    `choices` is a tuple, or a function returning the names a registry holds right now (its docstring says
    which registry), so a plugin's names are valid without editing this file."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] | Callable[[], Sequence[str]] | None = None
    items: int | None = None  # a sequence of exactly this many numbers, each in the range
    why: str = ""  # added to the error message
    note: str = ""  # what docs/config.md says is allowed when the check lives elsewhere (task, valid_on)

    def names(self) -> Sequence[str]:
        return self.choices() if callable(self.choices) else self.choices or ()

    def allowed(self) -> str:
        """Human text for errors and docs/config.md, e.g. "a finite number in (0, 1]" or "one of: a | b"."""
        if self.note:
            return self.note
        if self.choices is not None:
            label = f"{self.choices.__doc__}: " if callable(self.choices) else "one of: "
            return label + " | ".join(self.names())
        low = f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}" if self.gt is not None else None
        high = f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})" if self.lt is not None else None
        if low and high:
            text = f"in {low}, {high}"
        elif low:
            text = (">= " if low[0] == "[" else "> ") + low[1:]
        elif high:
            text = ("<= " if high[-1] == "]" else "< ") + high[:-1]
        else:
            text = "any"
        return f"{self.items} values, each {text}" if self.items else text

    def violation(self, value: Any) -> str | None:
        """None when `value` is allowed, else what is wrong ("must be >= 1, got 0")."""
        if value is None or self.note:  # a note means the check lives elsewhere (task, plugin, valid_on)
            return None
        if self.choices is not None:  # a list field: each of its items
            bad = [v for v in (value if isinstance(value, list) else [value]) if v not in self.names()]
            return f"must be one of {', '.join(self.names())}; got {bad[0]!r}" if bad else None
        values = value if self.items else (value,)
        if self.items and len(values) != self.items:
            return f"must have {self.items} values, got {len(values)}: {value!r}"
        for v in values:
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                return f"must be numbers, got {value!r}"
            if isinstance(v, float) and not math.isfinite(v):
                return f"must be a finite number {self.allowed()}, got {value!r}"
            if ((self.ge is not None and not v >= self.ge) or (self.gt is not None and not v > self.gt)
                    or (self.le is not None and not v <= self.le) or (self.lt is not None and not v < self.lt)):
                return f"must be {self.allowed()}, got {value!r}" + (f" ({self.why})" if self.why else "")
        return None


def _num(x: float) -> str:
    return f"{x:g}"


def option(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, **rule: Any) -> Any:
    """A dataclass field with its allowed values attached: `group_size: int = option(8, ge=2)`."""
    return field(default=default, default_factory=factory, metadata={"rule": Rule(**rule)})


def _rules(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any, Rule]]:
    """(dotted key, value, rule) for every field that carries a Rule, nested sections included."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _rules(value, f"{prefix}{f.name}.")
        elif "rule" in f.metadata:
            yield f"{prefix}{f.name}", value, f.metadata["rule"]
