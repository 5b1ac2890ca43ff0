"""Turning celpy's error values into short messages for users.

celpy words many failures with Python reprs (``<class 'celpy.celtypes.IntType'>``,
``Token('RULE', 'addition_add')``, ``StringType('x')``) or generic phrases ("no such
overload", "return error for overflow"); these helpers rewrite them in CEL's own terms.
"""

from __future__ import annotations

import re
from typing import Any

from celpy.evaluation import CELEvalError

from mantle.expressions.functions import type_name

__all__ = ["clean", "error_message", "key_text", "reword_call_error"]


def key_text(key: Any) -> str:
    """A map key as it appears in ``no such key: ...``."""
    return repr(str(key)) if isinstance(key, str) else str(key)


_CONVERSIONS = frozenset({"bool", "bytes", "double", "duration", "int", "timestamp", "uint"})


def reword_call_error(result: Any, name: str, arguments: list[Any]) -> Any:
    """Replace celpy's generic failure texts with the function name and the cause."""
    if not isinstance(result, CELEvalError) or result.__cause__ is None:
        return result
    cause = result.__cause__
    if isinstance(cause, TypeError):
        types = ", ".join(type_name(argument) for argument in arguments)
        return CELEvalError(f"{name}: no overload for ({types})")
    if name in _CONVERSIONS and len(arguments) == 1 and isinstance(arguments[0], str):
        return CELEvalError(f"{name}: cannot convert {str(arguments[0])!r}")
    return CELEvalError(f"{name}: {clean(str(cause))}")


_OPERATORS = {
    "addition_add": "+",
    "addition_sub": "-",
    "multiplication_mul": "*",
    "multiplication_div": "/",
    "multiplication_mod": "%",
    "relation_lt": "<",
    "relation_le": "<=",
    "relation_gt": ">",
    "relation_ge": ">=",
    "relation_eq": "==",
    "relation_ne": "!=",
    "relation_in": "in",
    "unary_not": "!",
    "unary_neg": "-",
}
_CEL_TYPE_NAMES = {
    "BoolType": "bool",
    "BytesType": "bytes",
    "DoubleType": "double",
    "DurationType": "duration",
    "IntType": "int",
    "ListType": "list",
    "MapType": "map",
    "NoneType": "null",
    "StringType": "string",
    "TimestampType": "timestamp",
    "UintType": "uint",
}
_CLASS = re.compile(r"<class '(?:celpy\.celtypes\.)?(\w+)'>")
_RULE = re.compile(r"Token\('RULE', '(\w+)'\)")
_WRAPPED = re.compile(
    r"\b(?:String|Int|Uint|Double|Bool)Type\(('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[^()]*)\)"
)
_APPLIED = re.compile(r"applied to '\((.*)\)'")


def clean(text: str) -> str:
    """Strip celpy's Python reprs (classes, grammar tokens, wrapped values) from a message."""
    text = _CLASS.sub(lambda m: _CEL_TYPE_NAMES.get(m.group(1), m.group(1)), text)
    text = _RULE.sub(lambda m: repr(_OPERATORS.get(m.group(1), m.group(1))), text)
    text = _WRAPPED.sub(r"\1", text)
    text = _APPLIED.sub(r"applied to (\1)", text)
    return text.replace("found no matching overload", "no matching overload")


def error_message(error: CELEvalError) -> str:
    """The detail text of a CEL error (celpy keeps it as the first argument)."""
    text = str(error.args[0]) if error.args else "evaluation failed"
    cause = error.args[1] if len(error.args) > 1 else None
    if isinstance(cause, type) and issubclass(cause, ZeroDivisionError):
        return "division by zero"
    if text == "return error for overflow":
        return "integer overflow"
    return clean(text)
