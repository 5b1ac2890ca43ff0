"""Where a step's expressions are, and which steps they name (SPEC 3, 3.3)."""

from __future__ import annotations

from typing import Any, Iterator

from mantle.expressions import find_templates, step_references

__all__ = ["param_strings", "param_templates", "implicit_dependencies"]


def param_strings(value: Any, path: tuple = ()) -> Iterator[tuple[tuple, str]]:
    """Every string inside ``params`` (nested maps and lists), with its path below params."""
    stack = [(path, value)]
    while stack:  # a loop, not recursion: params may be as deep as the loader allows
        where, item = stack.pop()
        if isinstance(item, str):
            yield where, item
        elif isinstance(item, dict):
            stack.extend((where + (key,), child) for key, child in reversed(item.items()))
        elif isinstance(item, list):
            stack.extend((where + (index,), child)
                         for index, child in reversed(list(enumerate(item))))


def param_templates(params: Any) -> Iterator[tuple[tuple, str]]:
    """``(path, expression)`` for every ``{{ expression }}`` in ``params``, in document order."""
    for where, text in param_strings(params):
        if "{{" in text:
            for expr in find_templates(text):
                yield where, expr


def implicit_dependencies(condition: str | None, params: Any) -> set[str]:
    """Step names referenced from the ``if`` and from templates anywhere in ``params``."""
    names: set[str] = set()
    if condition:
        names |= step_references(condition)
    for _, expr in param_templates(params):
        names |= step_references(expr)
    return names
