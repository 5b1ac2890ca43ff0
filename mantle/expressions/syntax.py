"""Text-level handling of CEL expressions and ``{{ }}`` templates (SPEC 3.2, 3.3).

Everything here works on source text and never evaluates anything, so the workflow validator
and the execution engine share one reading of where a template starts and ends, which names an
expression references, and whether it parses.
"""

from __future__ import annotations

import re
from typing import Iterator, NamedTuple

import lark
from celpy.celparser import CELParser

__all__ = [
    "MAX_EXPRESSION_LENGTH",
    "MAX_NESTING_DEPTH",
    "MAX_TEMPLATE_LENGTH",
    "ParseFailure",
    "find_templates",
    "parse",
    "rewrite_hyphens",
    "split_template",
    "step_references",
    "syntax_error",
    "variable_usage",
]

MAX_EXPRESSION_LENGTH = 10_000
MAX_TEMPLATE_LENGTH = 100_000
# Depth of the parse tree, not of brackets: every parenthesised level costs about ten tree
# levels in celpy's grammar, and celpy's evaluator recurses once per level, so this bounds
# the Python stack an expression can use (about 40 nested parentheses).
MAX_NESTING_DEPTH = 400

_NAME = re.compile(r"[a-z][a-z0-9-]*")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(r"[0-9][A-Za-z0-9_]*")
_SPACE = re.compile(r"\s*")
_STRING_PREFIXES = frozenset({"r", "R", "b", "B", "rb", "rB", "Rb", "RB", "br", "bR", "Br", "BR"})
_ROOTS = ("steps", "hooks")


class ParseFailure(Exception):
    """An expression is not valid CEL; the message is one readable line."""


class _Ref(NamedTuple):
    """A top-level identifier at ``text[start:end]``.

    For ``steps``/``hooks`` followed by ``.name`` or ``["name"]`` the span covers the member
    and ``name`` is set; otherwise ``name`` is None (any other use of the identifier).
    """

    root: str
    name: str | None
    start: int
    end: int
    dotted: bool


def _string_end(text: str, start: int, raw: bool) -> int:
    """End index of the string literal whose opening quote is at ``start``.

    An unterminated literal runs to the end of the text (the parser will reject it anyway).
    """
    quote = text[start]
    delimiter = quote * 3 if text.startswith(quote * 3, start) else quote
    i = start + len(delimiter)
    n = len(text)
    while i < n:
        char = text[i]
        if char == "\\" and not raw:
            i += 2
        elif text.startswith(delimiter, i):
            return i + len(delimiter)
        elif char == "\n" and len(delimiter) == 1:
            return i
        else:
            i += 1
    return n


def _string_value(literal: str) -> str | None:
    """The value of a simple quoted literal, or None when it has a prefix or escapes."""
    if len(literal) < 2 or literal[0] not in "'\"" or "\\" in literal:
        return None
    quote = literal[0]
    width = 3 if literal.startswith(quote * 3) and len(literal) >= 6 else 1
    if not literal.endswith(quote * width):
        return None
    return literal[width:-width]


def _references(expr: str) -> Iterator[_Ref]:
    """Yield every top-level identifier outside literals and comments, references resolved."""
    i, n = 0, len(expr)
    previous = ""  # last significant character before the current token
    while i < n:
        char = expr[i]
        if char in "'\"":
            i = _string_end(expr, i, raw=False)
            previous = '"'
        elif expr.startswith("//", i):
            end = expr.find("\n", i)
            i = n if end < 0 else end
        elif char.isspace():
            i += 1
        # ASCII only, as _NUMBER and _IDENT are: "²" and "é" are digit and letter to Python
        # but start nothing in CEL (the parser refuses them).
        elif char.isascii() and char.isdigit():
            i = _NUMBER.match(expr, i).end()
            previous = "0"
        elif char.isascii() and (char.isalpha() or char == "_"):
            word_end = _IDENT.match(expr, i).end()
            word = expr[i:word_end]
            if word in _STRING_PREFIXES and word_end < n and expr[word_end] in "'\"":
                i = _string_end(expr, word_end, raw="r" in word.lower())
                previous = '"'
                continue
            if previous == ".":
                i = word_end
                previous = "a"
                continue
            ref = _reference_at(expr, i, word, word_end)
            if ref is None:
                ref = _Ref(word, None, i, word_end, dotted=False)
            yield ref
            i = ref.end
            previous = "a" if ref.dotted or ref.name is None else "]"
        else:
            previous = char
            i += 1


def _reference_at(expr: str, start: int, word: str, word_end: int) -> _Ref | None:
    """The reference starting with identifier ``word`` at ``start``, if it is one."""
    if word not in _ROOTS:
        return None
    i = _SPACE.match(expr, word_end).end()
    if i >= len(expr):
        return None
    if expr[i] == ".":
        name = _NAME.match(expr, _SPACE.match(expr, i + 1).end())
        if name is None or expr.startswith("(", _SPACE.match(expr, name.end()).end()):
            return None  # not a name, or a macro/method call such as steps.exists(...)
        return _Ref(word, name.group(), start, name.end(), dotted=True)
    if expr[i] == "[":
        j = _SPACE.match(expr, i + 1).end()
        if j >= len(expr) or expr[j] not in "'\"":
            return None
        literal_end = _string_end(expr, j, raw=False)
        close = _SPACE.match(expr, literal_end).end()
        value = _string_value(expr[j:literal_end])
        if value is None or not expr.startswith("]", close):
            return None
        return _Ref(word, value, start, close + 1, dotted=False)
    return None


def rewrite_hyphens(expr: str) -> str:
    """Turn ``steps.fetch-data`` into ``steps["fetch-data"]`` (likewise ``hooks``), SPEC 3.3."""
    if "-" not in expr:
        return expr
    pieces: list[str] = []
    done = 0
    for ref in _references(expr):
        if ref.dotted and "-" in ref.name:
            pieces.append(expr[done : ref.start])
            pieces.append(f'{ref.root}["{ref.name}"]')
            done = ref.end
    if not pieces:
        return expr
    pieces.append(expr[done:])
    return "".join(pieces)


def step_references(expr: str) -> set[str]:
    """Names of the main steps ``expr`` refers to (implicit dependencies, SPEC 3.3)."""
    return {ref.name for ref in _references(expr) if ref.root == "steps" and ref.name}


def variable_usage(expr: str) -> dict[str, frozenset[str] | None]:
    """Top-level identifiers of ``expr`` mapped to the member names it reads from them.

    The names are known only for ``steps``/``hooks`` used purely as ``steps.x`` or
    ``steps["x"]``; None means the expression may read anything in that variable.
    """
    usage: dict[str, set[str] | None] = {}
    for ref in _references(expr):
        if ref.name is None or ref.root not in _ROOTS:
            usage[ref.root] = None
        else:
            names = usage.setdefault(ref.root, set())
            if names is not None:
                names.add(ref.name)
    return {root: None if names is None else frozenset(names) for root, names in usage.items()}


def _template_end(text: str, start: int) -> int:
    """Index of the ``}}`` closing the template whose body starts at ``start``, or -1.

    A ``}}`` inside a string literal does not close it; if that reading finds no close (an
    unterminated quote, say), the first ``}}`` does, so a typo surfaces as a syntax error
    rather than silently becoming literal text.
    """
    i, n = start, len(text)
    while i < n:
        char = text[i]
        if char in "'\"":
            i = _string_end(text, i, raw=i > start and text[i - 1] in "rR")
        elif text.startswith("}}", i):
            return i
        else:
            i += 1
    return text.find("}}", start)


def split_template(text: str) -> list[tuple[str, str | None]]:
    """Split a params string into ``(literal, None)`` and ``(expr_source, expr)`` pieces.

    ``expr_source`` is the whole ``{{ ... }}`` text and ``expr`` the stripped expression. An
    unclosed ``{{`` and everything after it is literal (SPEC 3.2).
    """
    pieces: list[tuple[str, str | None]] = []
    done = 0
    while True:
        open_at = text.find("{{", done)
        if open_at < 0:
            break
        close_at = _template_end(text, open_at + 2)
        if close_at < 0:
            break
        if open_at > done:
            pieces.append((text[done:open_at], None))
        pieces.append((text[open_at : close_at + 2], text[open_at + 2 : close_at].strip()))
        done = close_at + 2
    if done < len(text):
        pieces.append((text[done:], None))
    return pieces


def find_templates(text: str) -> list[str]:
    """The stripped expressions of every ``{{ ... }}`` in ``text``, in order."""
    if "{{" not in text:
        return []
    return [expr for _, expr in split_template(text) if expr is not None]


def _lark() -> lark.Lark:
    if CELParser.CEL_PARSER is None:
        CELParser()  # builds celpy's process-wide LALR parser
    return CELParser.CEL_PARSER


def _describe(error: lark.exceptions.UnexpectedInput, text: str) -> str:
    """One line for a lark parse error, naming the offending token and its position."""
    if isinstance(error, lark.exceptions.UnexpectedCharacters):
        line, column = error.line, error.column
        if error.char in "'\"":
            what = "unterminated string"
        else:
            what = f"unexpected character {error.char!r}"
    elif isinstance(error, lark.exceptions.UnexpectedToken) and error.token.type != "$END":
        line, column = error.line, error.column
        what = f"unexpected {error.token.value!r}"
    else:
        lines = text.split("\n")
        line, column = len(lines), len(lines[-1]) + 1
        what = "unexpected end of expression"
    where = f"column {column}" if line == 1 else f"line {line}, column {column}"
    return f"{what} at {where}"


def _depth(tree: lark.Tree) -> int:
    """Height of ``tree``, computed without recursion."""
    deepest = 0
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in node.children if isinstance(child, lark.Tree))
    return deepest


def parse(expr: str) -> lark.Tree:
    """Check the limits, rewrite hyphenated references and parse; raise ParseFailure.

    Positions in messages refer to the rewritten text, which differs from ``expr`` only
    after a hyphenated reference.
    """
    if not expr.strip():
        raise ParseFailure("empty expression")
    if len(expr) > MAX_EXPRESSION_LENGTH:
        raise ParseFailure(
            f"expression is {len(expr)} characters long (limit {MAX_EXPRESSION_LENGTH})"
        )
    source = rewrite_hyphens(expr)
    try:
        tree = _lark().parse(source)
    except lark.exceptions.UnexpectedInput as error:
        raise ParseFailure(_describe(error, source)) from None
    except (lark.exceptions.LarkError, RecursionError) as error:
        raise ParseFailure(f"cannot parse: {type(error).__name__}") from None
    if _depth(tree) > MAX_NESTING_DEPTH:
        raise ParseFailure("expression is nested too deeply")
    return tree


def syntax_error(expr: str) -> str | None:
    """None when ``expr`` is valid CEL after hyphen rewriting, else a one-line message."""
    try:
        parse(expr)
    except ParseFailure as failure:
        return str(failure)
    return None
