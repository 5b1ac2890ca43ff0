"""Pytest fixtures from the helpers; the root conftest imports them."""

from __future__ import annotations

import pytest

from tests.helpers.http_target import HttpTarget

__all__ = ["http_target"]


@pytest.fixture
def http_target():
    """A fresh local HTTP server (``HttpTarget``), closed after the test."""
    with HttpTarget() as target:
        yield target
