"""Validation error records, path rendering and the collector that positions them (SPEC 2.7)."""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable

from mantle.errors import ValidationFailed

__all__ = ["ValidationError", "Path", "format_path", "sorted_errors", "Collector", "DOCUMENT"]

Path = tuple  # of str (mapping keys) and int (list indexes)

#: The path shown for errors about the file as a whole (rules 1 and 2).
DOCUMENT = "document"

# Characters that would break an error's line (or, like a carriage return, hide part of it).
_LINE_BREAKING = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _one_line(text: str) -> str:
    """``text`` with each control or line-separator character escaped (``\\n``, ``\\x1b``)."""
    return _LINE_BREAKING.sub(lambda match: ascii(match.group())[1:-1], text)


@dataclasses.dataclass(frozen=True, slots=True)
class ValidationError:
    """One broken rule: 1-based position, SPEC 2.7 message and path, and the rule number."""

    line: int
    column: int
    message: str
    path: str
    rule: int

    def format(self, filename: str) -> str:
        """The SPEC 2.7 line, always one: values and keys quoted in it may hold line breaks,
        which are escaped. ``filename`` should already be the base name."""
        return (f"{_one_line(filename)}:{self.line}:{self.column}: error: "
                f"{_one_line(self.message)} ({_one_line(self.path)})")

    def sort_key(self) -> tuple[int, int, int]:
        return (self.line, self.column, self.rule)


def format_path(path: Path) -> str:
    """``("steps", 1, "retry")`` -> ``steps[1].retry``; the empty path is ``document``."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text or DOCUMENT


def sorted_errors(errors: Iterable[ValidationError]) -> list[ValidationError]:
    """Line, column, then rule number; equal keys keep discovery order (sort is stable)."""
    return sorted(errors, key=ValidationError.sort_key)


class Collector:
    """Gathers errors for one document, positioning each from the loader's key positions.

    ``positions`` maps a path to the (line, column) of its key, or of a list item's first key.
    A path without a position takes its nearest present ancestor's, and ``1:1`` when none is
    present (the document itself and absent top-level fields).
    """

    def __init__(self, positions: dict[Path, tuple[int, int]],
                 errors: Iterable[ValidationError] = ()):
        self.positions = positions
        self.errors: list[ValidationError] = list(errors)

    def position(self, path: Path) -> tuple[int, int]:
        for end in range(len(path), 0, -1):
            found = self.positions.get(tuple(path[:end]))
            if found is not None:
                return found
        return (1, 1)

    def add(self, rule: int, path: Path, message: str) -> None:
        line, column = self.position(path)
        self.errors.append(ValidationError(line, column, message, format_path(path), rule))

    def raise_if_any(self) -> None:
        if self.errors:
            raise ValidationFailed(sorted_errors(self.errors))
