"""Fixtures for the REST API tests: a started engine and the Falcon app on the ``db`` case."""

from __future__ import annotations

import falcon.testing
import pytest

from tests.helpers.database import bound_database

from actors.engine import Engine
from mantle.daemon.readiness import Readiness
from mantle.metrics import Metrics
from web.app import create_app


@pytest.fixture
def engine(db, tmp_path):
    started = Engine(db, metrics=Metrics(), plugins_dir=str(tmp_path / "plugins"), env={},
                     secrets={}).start()
    yield started
    started.shutdown(timeout=2)


@pytest.fixture
def readiness(db) -> Readiness:
    ready = Readiness(db).start()
    ready.mark_ready()
    yield ready
    ready.stop()


@pytest.fixture
def app(engine, db, readiness):
    return create_app(engine, engine.metrics, db, readiness)


@pytest.fixture
def client(app) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(app)


@pytest.fixture
def sqlite_url(tmp_path):
    """A migrated SQLite database, bound in the test process too."""
    with bound_database(f"sqlite:///{tmp_path / 'mantle.db'}", migrate=True) as database:
        yield f"sqlite:///{database.database}"
