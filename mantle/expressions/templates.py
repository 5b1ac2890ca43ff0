"""Resolving ``{{ expr }}`` templates inside step params (SPEC 3.2)."""

from __future__ import annotations

import functools
from typing import Any

from mantle.expressions.evaluation import ActivationCache, evaluate
from mantle.expressions.syntax import MAX_TEMPLATE_LENGTH, split_template
from mantle.expressions.values import MAX_VALUE_SIZE, ExpressionError, render_text, size_error

__all__ = ["resolve_params", "resolve_string"]

# Plans are cached for short strings only, so the cache cannot pin much memory.
_CACHED_TEXT_LIMIT = 2_000


@functools.lru_cache(maxsize=4096)
def _cached_plan(text: str) -> tuple[tuple[str, str | None], ...] | str:
    return _make_plan(text)


def _make_plan(text: str) -> tuple[tuple[str, str | None], ...] | str:
    """The string's pieces, or just the expression when the whole value is one template."""
    pieces = split_template(text)
    templates = [expr for _, expr in pieces if expr is not None]
    only_space_around = all(expr is not None or not piece.strip() for piece, expr in pieces)
    if len(templates) == 1 and only_space_around:
        return templates[0]
    return tuple(pieces)


def _plan(text: str) -> tuple[tuple[str, str | None], ...] | str:
    if len(text) > MAX_TEMPLATE_LENGTH:
        raise ExpressionError(
            f"template is {len(text)} characters long (limit {MAX_TEMPLATE_LENGTH})"
        )
    return _cached_plan(text) if len(text) <= _CACHED_TEXT_LIMIT else _make_plan(text)


def resolve_string(
    text: str,
    activation: dict[str, Any],
    cache: ActivationCache | None = None,
    budget: list[int] | None = None,
) -> Any:
    """Resolve one params string: a lone template keeps its result's type, else text.

    The results count against ``budget`` (``[remaining]`` characters and items, shared by the
    strings given it; one of MAX_VALUE_SIZE if none), so one large value named many times
    cannot join into a string of any size.
    """
    if "{{" not in text:
        return text
    cache = cache or ActivationCache(activation)
    budget = budget if budget is not None else [MAX_VALUE_SIZE]
    plan = _plan(text)
    if isinstance(plan, str):
        return evaluate(plan, activation, cache, budget)
    # Results are placed into the output, never re-scanned, so a value that itself contains
    # "{{ }}" stays literal.
    return "".join(
        piece if expr is None else _text(evaluate(expr, activation, cache, budget), budget)
        for piece, expr in plan
    )


def _text(value: Any, budget: list[int]) -> str:
    if isinstance(value, str):  # counted already
        return value
    text = render_text(value)
    budget[0] -= len(text)
    if budget[0] < 0:
        raise ExpressionError(size_error())
    return text


def resolve_params(
    value: Any,
    activation: dict[str, Any],
    cache: ActivationCache | None = None,
    budget: list[int] | None = None,
) -> Any:
    """Resolve every string in nested dicts and lists; keys and non-strings are left alone.

    All of the results together are bounded as in ``resolve_string``.
    """
    cache = cache or ActivationCache(activation)
    budget = budget if budget is not None else [MAX_VALUE_SIZE]
    if isinstance(value, str):
        return resolve_string(value, activation, cache, budget)
    if isinstance(value, dict):
        return {key: resolve_params(item, activation, cache, budget)
                for key, item in value.items()}
    if isinstance(value, list):
        return [resolve_params(item, activation, cache, budget) for item in value]
    return value
