"""Small helpers shared by the test packages: store a workflow, wait on a condition."""

from __future__ import annotations

import textwrap
import time

from mantle import definitions
from mantle.workflow import load_workflow

__all__ = ["apply_yaml", "wait_until", "wait_until_keys_apply"]


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


def wait_until_keys_apply(daemon, required: bool = True) -> None:
    """Wait until a daemon in another process sees the API keys as they now are (it reads
    them at most ``apikeys.KEYS_FRESH_FOR`` apart): until an unauthenticated request is
    refused with 401 (``required``) or no longer is."""
    wait_until(lambda: (daemon.get("/api/v1/workflows").status == 401) == required,
               timeout=10, interval=0.05,
               message=f"API keys not {'required' if required else 'dropped'} within 10 s")
