"""Fixtures for engine tests: a started Engine on the parametrised database, and helpers."""

from __future__ import annotations

import textwrap
import time

import pytest

from actors.engine import Engine
from mantle import definitions, queries
from mantle.metrics import Metrics
from mantle.workflow import load_workflow


@pytest.fixture
def secrets():
    return {}


@pytest.fixture
def engine(db, tmp_path, secrets):
    started = Engine(db, metrics=Metrics(), plugins_dir=str(tmp_path / "plugins"),
                     env={"REGION": "eu"}, secrets=secrets).start()
    yield started
    started.shutdown(timeout=2)


def apply(text: str) -> str:
    """Apply a workflow given as (indented) YAML text; return its name."""
    raw = textwrap.dedent(text).encode()
    workflow = load_workflow(raw)
    definitions.apply_definition(raw, workflow)
    return workflow.name


def finish(engine: Engine, execution_id: str, timeout: float = 15.0) -> dict:
    """Wait for the execution to end and return its detail; fail with the step errors."""
    status = engine.wait(execution_id, timeout=timeout)
    detail = queries.execution_detail(execution_id)
    assert status is not None, f"execution did not finish in {timeout}s: {detail}"
    return detail


def run(engine: Engine, workflow: str, inputs=None, timeout: float = 15.0, **kwargs) -> dict:
    result = engine.run(workflow, inputs, **kwargs)
    return finish(engine, result.execution_id, timeout)


def steps_of(detail: dict) -> dict[str, dict]:
    return {step["name"]: step for step in detail["steps"]}


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02, message: str = ""):
    """Poll ``predicate`` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(message or f"condition not met within {timeout}s")
        time.sleep(interval)
