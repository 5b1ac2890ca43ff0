"""Shared helpers for the workflow tests (no tests here): load YAML text, look at its errors."""

from __future__ import annotations

import textwrap

import pytest

from mantle.errors import ValidationFailed
from mantle.workflow import ValidationError, load_workflow

__all__ = ["errors_of", "only_error", "as_tuple", "load_text"]


def load_text(text: str):
    return load_workflow(textwrap.dedent(text).encode())


def errors_of(text: str) -> list[ValidationError]:
    """All errors of a YAML text that must fail validation."""
    with pytest.raises(ValidationFailed) as failure:
        load_text(text)
    return failure.value.errors


def as_tuple(error: ValidationError) -> tuple:
    return (error.line, error.column, error.message, error.path, error.rule)


def only_error(text: str) -> tuple:
    """The single error of a YAML text, as (line, column, message, path, rule)."""
    found = errors_of(text)
    assert len(found) == 1, [error.format("f") for error in found]
    return as_tuple(found[0])
