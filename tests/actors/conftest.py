"""Fixtures for engine tests: a started Engine on the parametrised database, and helpers."""

from __future__ import annotations


import pytest

from actors.engine import Engine
from mantle import queries
from mantle.metrics import Metrics
from tests.helpers.waiting import apply_yaml as apply  # noqa: F401 - re-exported
from tests.helpers.waiting import wait_until  # noqa: F401 - re-exported


@pytest.fixture
def secrets():
    return {}


@pytest.fixture
def engine(db, tmp_path, secrets):
    started = Engine(db, metrics=Metrics(), plugins_dir=str(tmp_path / "plugins"),
                     env={"REGION": "eu"}, secrets=secrets).start()
    yield started
    started.shutdown(timeout=2)




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

