"""YAML bytes to plain JSON-able data, with the position of every key and list item.

PyYAML's own constructors follow YAML 1.1 (``on`` is ``True``, dates become ``date``), overwrite
duplicate keys silently and expand aliases without limit, so only its scanner, parser and composer
are used here; the node tree is turned into data by ``_Builder``, which:

- resolves plain scalars with the YAML 1.2 core schema (``yes``/``no``/``on``/``off`` and dates
  stay strings; ``0o17``/``0x1f`` are integers; ``.inf``/``.nan`` are floats);
- keeps non-finite floats as their source text, because JSON (the stored definition) has no
  NaN or infinity;
- turns every mapping key into its text (``1: x`` has the key ``"1"``);
- records duplicate keys as rule-3 errors, keeping the first value;
- refuses a scalar or key holding a UTF-16 surrogate (only an escape can write one, and no
  database column can store it) as a rule-1 error;
- refuses nesting deeper than ``MAX_DEPTH`` and more than ``MAX_NODES`` nodes after alias
  expansion, so alias bombs and deep nesting fail fast as rule-1 errors.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.nodes import MappingNode, ScalarNode, SequenceNode
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import BaseResolver
from yaml.scanner import Scanner

from mantle.text import LONE_SURROGATE
from mantle.workflow.report import DOCUMENT, Path, ValidationError, format_path

__all__ = ["LoadedDocument", "DocumentError", "load_document", "MAX_DEPTH", "MAX_NODES"]

MAX_DEPTH = 64
MAX_NODES = 100_000

_TAG = "tag:yaml.org,2002:"
_NON_FINITE = re.compile(r"inf|nan", re.IGNORECASE)
_CORE_SCHEMA = (
    (_TAG + "null", re.compile(r"~|null|Null|NULL|")),
    (_TAG + "bool", re.compile(r"true|True|TRUE|false|False|FALSE")),
    (_TAG + "int", re.compile(r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+")),
    (_TAG + "float", re.compile(
        r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)")),
)


@dataclasses.dataclass(frozen=True, slots=True)
class LoadedDocument:
    """The parsed document and what validation needs to report on it.

    ``positions``: path -> (line, column) of each mapping key and each list item (its first
    key when the item is a non-empty mapping). ``texts``: path -> source text of every scalar
    value that did not become a string (``30``, ``true``, ``~``), so string fields can use the
    text as written. ``duplicates``: rule-3 errors.
    """

    data: Any
    positions: dict[Path, tuple[int, int]]
    texts: dict[Path, str]
    duplicates: tuple[ValidationError, ...]


class DocumentError(Exception):
    """The bytes are not one usable YAML document: a rule-1 error."""

    def __init__(self, line: int, column: int, reason: str):
        super().__init__(reason)
        self.error = ValidationError(line, column, f"invalid YAML: {reason}", DOCUMENT, 1)


def load_document(raw: bytes) -> LoadedDocument:
    """Parse ``raw``; raise DocumentError when it is not valid UTF-8 or not one YAML document."""
    text = _decode(raw)
    loader = None
    try:
        loader = _Loader(text)
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        raise _document_error(exc) from None
    except yaml.reader.ReaderError as exc:
        line, column = _line_column(text, exc.position)
        raise DocumentError(line, column, f"{exc.reason} (character #x{exc.character:04x})"
                            if isinstance(exc.character, int) else exc.reason) from None
    finally:
        if loader is not None:
            loader.dispose()
    builder = _Builder()
    data = None if node is None else builder.build(node, (), 1)
    return LoadedDocument(data, builder.positions, builder.texts, tuple(builder.duplicates))


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_start = raw.rfind(b"\n", 0, exc.start) + 1
        line = raw.count(b"\n", 0, exc.start) + 1
        column = len(raw[line_start:exc.start].decode("utf-8", errors="replace")) + 1
        raise DocumentError(line, column, f"the file is not valid UTF-8 ({exc.reason} "
                                          f"0x{raw[exc.start]:02x})") from None


def _line_column(text: str, index: int) -> tuple[int, int]:
    line_start = text.rfind("\n", 0, index) + 1
    return text.count("\n", 0, index) + 1, index - line_start + 1


def _document_error(exc: yaml.MarkedYAMLError) -> DocumentError:
    mark = exc.problem_mark or exc.context_mark
    line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
    problem = exc.problem or exc.context or "unreadable document"
    if exc.context and problem.startswith("but "):
        # "but found another document" only makes sense after its context.
        problem = f"{exc.context}, {problem}"
    return DocumentError(line, column, problem)


class _CoreResolver(BaseResolver):
    """Plain scalars by the YAML 1.2 core schema; quoted ones stay strings."""

    def resolve(self, kind, value, implicit):
        if kind is ScalarNode and implicit[0]:
            for tag, pattern in _CORE_SCHEMA:
                if pattern.fullmatch(value):
                    return tag
            return _TAG + "str"
        return super().resolve(kind, value, implicit)


class _DepthLimitedComposer(Composer):
    """The composer recurses per nesting level; stop before Python's recursion limit does."""

    def __init__(self) -> None:
        super().__init__()
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise DocumentError(mark.line + 1, mark.column + 1, _too_deep())
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_scalar_node(self, anchor):
        verbatim = self.peek_event().tag == "!"
        node = super().compose_scalar_node(anchor)
        if verbatim:  # the non-specific tag "!" makes a scalar a string (YAML 1.2, 6.9.1)
            node.tag = _TAG + "str"
        return node


class _Loader(Reader, Scanner, Parser, _DepthLimitedComposer, _CoreResolver):
    def __init__(self, stream: str):
        Reader.__init__(self, stream)
        Scanner.__init__(self)
        Parser.__init__(self)
        _DepthLimitedComposer.__init__(self)
        _CoreResolver.__init__(self)


def _too_deep() -> str:
    return f"nesting deeper than {MAX_DEPTH} levels"


class _Builder:
    """Node tree to data; aliases are expanded (and counted) at every place they appear."""

    def __init__(self) -> None:
        self.count = 0
        self.positions: dict[Path, tuple[int, int]] = {}
        self.texts: dict[Path, str] = {}
        self.duplicates: list[ValidationError] = []

    def build(self, node, path: Path, depth: int) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise _node_error(node, f"more than {MAX_NODES} nodes after alias expansion")
        if depth > MAX_DEPTH:  # reachable through recursive aliases (&a [*a])
            raise _node_error(node, _too_deep())
        if isinstance(node, ScalarNode):
            return self._scalar(node, path)
        if isinstance(node, SequenceNode):
            _require_tag(node, "seq")
            return self._sequence(node, path, depth)
        _require_tag(node, "map")
        return self._mapping(node, path, depth)

    def _sequence(self, node: SequenceNode, path: Path, depth: int) -> list:
        items = []
        for index, item in enumerate(node.value):
            item_path = path + (index,)
            self.positions[item_path] = _item_position(item)
            items.append(self.build(item, item_path, depth + 1))
        return items

    def _mapping(self, node: MappingNode, path: Path, depth: int) -> dict:
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = _key_text(key_node)
            key_path = path + (key,)
            position = _mark(key_node)
            if key in result:
                line, column = position
                self.duplicates.append(ValidationError(
                    line, column, f'duplicate key "{key}"', format_path(key_path), 3))
                continue
            self.positions[key_path] = position
            result[key] = self.build(value_node, key_path, depth + 1)
        return result

    def _scalar(self, node: ScalarNode, path: Path) -> Any:
        value = _scalar_value(node)
        if not isinstance(value, str):
            self.texts[path] = node.value
        return value


def _mark(node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _item_position(node) -> tuple[int, int]:
    if isinstance(node, MappingNode) and node.value:
        return _mark(node.value[0][0])
    return _mark(node)


def _node_error(node, reason: str) -> DocumentError:
    line, column = _mark(node)
    return DocumentError(line, column, reason)


def _require_tag(node, kind: str) -> None:
    if node.tag != _TAG + kind:
        raise _node_error(node, f"unsupported tag {node.tag!r}")


def _key_text(node) -> str:
    if not isinstance(node, ScalarNode):
        raise _node_error(node, "a mapping key must be a scalar")
    _scalar_value(node)  # rejects unsupported tags on keys too
    return node.value


def _scalar_value(node: ScalarNode) -> Any:
    """Construct a scalar by its (resolved or explicit) tag."""
    tag, text = node.tag, node.value
    if surrogate := LONE_SURROGATE.search(text):
        # Only an escape (\ud800, \U0000dfff) writes one, as the bytes are strict UTF-8; no
        # database, JSON document or HTTP body can carry it: apply would crash storing it.
        raise _node_error(node, f"escape of a UTF-16 surrogate (U+{ord(surrogate.group()):04X}) "
                                "is not a character")
    if tag == _TAG + "str":
        return text
    kind = tag[len(_TAG):] if tag.startswith(_TAG) else None
    pattern = dict(_CORE_SCHEMA).get(tag)
    if kind is None or pattern is None:
        raise _node_error(node, f"unsupported tag {tag!r}")
    if not pattern.fullmatch(text):
        raise _node_error(node, f"{text!r} is not a valid !!{kind}")
    if kind == "null":
        return None
    if kind == "bool":
        return text.lower() == "true"
    try:
        if kind == "int":
            return _integer(text)
        number = float(text) if not _NON_FINITE.search(text) else math.inf
    except ValueError as exc:  # e.g. Python's limit on the digits of an int
        raise _node_error(node, f"bad !!{kind} value: {exc}") from None
    # JSON (the stored definition) cannot hold NaN or infinity (also 1e999): keep the text.
    return number if math.isfinite(number) else text


def _integer(text: str) -> int:
    if text.startswith("0o"):
        return int(text[2:], 8)
    if text.startswith("0x"):
        return int(text[2:], 16)
    return int(text)
