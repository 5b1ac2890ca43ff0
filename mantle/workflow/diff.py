"""Leaf-level comparison of two parsed definitions, for ``mantle plan`` (SPEC 6.1)."""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

__all__ = ["Change", "diff_definitions", "leaves", "render_leaf", "SECRET_SHOWN"]

# A webhook secret's value is never printed (SPEC 13.1.1): its line says only that it changed.
SECRET_SHOWN = "(changed)"
_SECRET = re.compile(r"triggers\[[0-9]+\]\.secret")


@dataclasses.dataclass(frozen=True, slots=True)
class Change:
    """One changed leaf: ``kind`` is ``~`` (changed), ``+`` (added) or ``-`` (removed)."""

    kind: str
    path: str
    old: Any = None
    new: Any = None

    def render(self) -> str:
        if _SECRET.fullmatch(self.path):
            return f"  {self.kind} {self.path}: {SECRET_SHOWN}"
        if self.kind == "~":
            return f"  ~ {self.path}: {render_leaf(self.old)} → {render_leaf(self.new)}"
        value = self.new if self.kind == "+" else self.old
        return f"  {self.kind} {self.path}: {render_leaf(value)}"


# A key that could be read as more than one path element is written as ``["a.b"]``.
_PLAIN_KEY = re.compile(r'[^.\[\]"]+')


def _member(path: str, key: str) -> str:
    if not _PLAIN_KEY.fullmatch(key):
        return f"{path}[{json.dumps(key, ensure_ascii=False)}]"
    return f"{path}.{key}" if path else key


def leaves(value: Any, path: str = "") -> dict[str, Any]:
    """Flatten to ``{path: leaf}`` in document order; lists by index, empty containers are
    leaves. Keys holding ``.``, ``[``, ``]`` or ``"`` (or empty) are quoted (``params["a.b"]``)
    so that no two leaves share a path."""
    out: dict[str, Any] = {}
    if isinstance(value, dict) and value:
        for key, item in value.items():
            out.update(leaves(item, _member(path, str(key))))
    elif isinstance(value, list) and value:
        for index, item in enumerate(value):
            out.update(leaves(item, f"{path}[{index}]"))
    else:
        out[path] = value
    return out


def diff_definitions(old: Any, new: Any) -> list[Change]:
    """Changed and added leaves in the new document's order, then removed ones in the old order."""
    before, after = leaves(old), leaves(new)
    changes = []
    for path, value in after.items():
        if path not in before:
            changes.append(Change("+", path, new=value))
        elif not _same(before[path], value):
            changes.append(Change("~", path, old=before[path], new=value))
    changes.extend(Change("-", path, old=value) for path, value in before.items()
                   if path not in after)
    return changes


def _same(a: Any, b: Any) -> bool:
    # 1 and 1.0 and True compare equal in Python but are different YAML values.
    return type(a) is type(b) and a == b


def render_leaf(value: Any) -> str:
    """Strings raw, everything else compact JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
