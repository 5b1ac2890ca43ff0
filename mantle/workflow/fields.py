"""Typed reads of document fields with rule-4 errors (``<key> must be a string``, ...).

Every read answers the value, ``None`` when the field is absent or null (null counts as not
set everywhere), or ``WRONG`` after reporting a rule-4 error. A scalar read as a string becomes
its source text, written back into the document so the stored definition holds what the engine
uses (``timeout: 30`` is stored as ``"30"``).
"""

from __future__ import annotations

from typing import Any

from mantle.workflow.report import Collector, Path

__all__ = ["WRONG", "FieldReader", "scalar_text", "label"]


class _Wrong:
    __slots__ = ()

    def __repr__(self) -> str:
        return "WRONG"


#: Marker for a field of the wrong YAML kind (already reported).
WRONG: Any = _Wrong()

_KINDS = {
    "string": "a string",
    "integer": "an integer",
    "boolean": "a boolean",
    "list": "a list",
    "mapping": "a mapping",
}


def scalar_text(value: Any) -> str:
    """Text of a non-string scalar when its source text is unknown (rebuilt definitions)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def label(path: Path) -> str:
    """The ``<key>`` of a rule-4 message: the last key, with the indexes after it."""
    suffix = ""
    for part in reversed(path):
        if isinstance(part, int):
            suffix = f"[{part}]" + suffix
        else:
            return f"{part}{suffix}"
    return suffix or "document"


class FieldReader:
    """Reads fields of the loaded document, reporting wrong kinds through ``collector``."""

    def __init__(self, collector: Collector, texts: dict[Path, str]):
        self.collector = collector
        self.texts = texts

    def string(self, container, key, path: Path) -> Any:
        value = self._get(container, key)
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, (dict, list)):
            return self._wrong("string", path)
        text = self.texts.get(path, scalar_text(value))
        container[key] = text
        return text

    def integer(self, container, key, path: Path) -> Any:
        value = self._get(container, key)
        if value is None or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        return self._wrong("integer", path)

    def boolean(self, container, key, path: Path) -> Any:
        value = self._get(container, key)
        if value is None or isinstance(value, bool):
            return value
        return self._wrong("boolean", path)

    def list(self, container, key, path: Path) -> Any:
        value = self._get(container, key)
        if value is None or isinstance(value, list):
            return value
        return self._wrong("list", path)

    def mapping(self, container, key, path: Path) -> Any:
        value = self._get(container, key)
        if value is None or isinstance(value, dict):
            return value
        return self._wrong("mapping", path)

    def strings(self, container, key, path: Path) -> list[str]:
        """A list of strings (scalars as their text); null items are rule-4 errors too."""
        items = self.list(container, key, path)
        if items is None or items is WRONG:
            return []
        found = []
        for index in range(len(items)):
            item_path = path + (index,)
            value = self.string(items, index, item_path)
            if value is None:
                self._wrong("string", item_path)
            elif value is not WRONG:
                found.append(value)
        return found

    def mapping_items(self, container, key, path: Path) -> list[tuple[Path, dict]]:
        """The mappings of a list field, each with its path; other items are rule-4 errors."""
        items = self.list(container, key, path)
        if items is None or items is WRONG:
            return []
        found = []
        for index, item in enumerate(items):
            if isinstance(item, dict):
                found.append((path + (index,), item))
            else:
                self._wrong("mapping", path + (index,))
        return found

    @staticmethod
    def _get(container, key) -> Any:
        if isinstance(container, dict):
            return container.get(key)
        return container[key]

    def _wrong(self, kind: str, path: Path) -> Any:
        self.collector.add(4, path, f"{label(path)} must be {_KINDS[kind]}")
        return WRONG
