"""Small helpers shared by the test packages: store a workflow, wait on a condition."""

from __future__ import annotations

import textwrap
import time

from mantle import definitions
from mantle.workflow import load_workflow

__all__ = ["apply_yaml", "wait_until"]


def apply_yaml(text: str) -> str:
    """Apply a workflow given as (indented) YAML on the bound database; return its name."""
    raw = textwrap.dedent(text).encode()
    workflow = load_workflow(raw)
    definitions.apply_definition(raw, workflow)
    return workflow.name


def wait_until(predicate, timeout: float = 15.0, interval: float = 0.02, message: str = ""):
    """Poll ``predicate`` until it returns something truthy; AssertionError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(message or f"condition not met within {timeout}s")
        time.sleep(interval)
