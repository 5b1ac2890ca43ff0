"""Shared fixtures: databases on both engines, the session PostgreSQL cluster, actor cleanup.

Database fixtures are parametrised over ``sqlite`` (a file in ``tmp_path``) and ``postgres``
(a fresh database in the session cluster), so ``-k postgres`` / ``-k sqlite`` or
``-m "not postgres"`` select one engine:

- ``db_url``: URL of a blank database.       ``blank_db``: it, connected and bound.
- ``migrated_db_url``: URL of a migrated one (for CLI subprocesses).
- ``db``: a migrated database, connected and bound.
- ``pg_cluster``: the session's ``tests.pg.PgCluster`` (``url``, ``create_database()``,
  ``drop_database()``, ``url_for()``).

Without PostgreSQL 15 the ``postgres`` cases are skipped, except with ``CI=true`` where they
fail.
"""

from __future__ import annotations


import pykka
import pytest

from mantle import db as mantle_db
from mantle.db import migrations
from tests.helpers.alone import pytest_runtest_protocol  # noqa: F401 -- the alone mark
from tests.helpers.database import bound_database
from tests.helpers.fixtures import *  # noqa: F401,F403 -- shared fixtures live there
from tests.pg import PgCluster, started_or_skip

_MIGRATED_TEMPLATE = "mantle_migrated_template"

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
]


@pytest.fixture(autouse=True)
def _stop_actors():
    """Every test ends with no actor left running (STYLE habit 9)."""
    yield
    pykka.ActorRegistry.stop_all(block=True, timeout=10)


@pytest.fixture(scope="session")
def pg_cluster():
    """A PostgreSQL 15 cluster for the whole session, started on first use."""
    cluster = started_or_skip(PgCluster())
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def _pg_migrated_template(pg_cluster) -> str:
    """A migrated database that per-test databases are copied from (cheaper than migrating)."""
    url = pg_cluster.create_database(_MIGRATED_TEMPLATE)
    database = mantle_db.connect(url)
    try:
        migrations.migrate(database)
    finally:
        mantle_db.close_all(database)  # CREATE DATABASE ... TEMPLATE needs it unused
    return _MIGRATED_TEMPLATE


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    """``sqlite`` or ``postgres``: the engine this test case runs on."""
    return request.param


def _pg_database(request, migrated: bool):
    cluster = request.getfixturevalue("pg_cluster")
    template = request.getfixturevalue("_pg_migrated_template") if migrated else "template0"
    name = cluster.new_name("mig" if migrated else "blank")
    url = cluster.create_database(name, template=template)
    request.addfinalizer(lambda: cluster.drop_database(name))
    return url


@pytest.fixture
def db_url(backend, request, tmp_path) -> str:
    """URL of a blank (unmigrated) database of this case's engine."""
    if backend == "postgres":
        return _pg_database(request, migrated=False)
    return f"sqlite:///{tmp_path / 'blank.db'}"


@pytest.fixture
def migrated_db_url(backend, request, tmp_path) -> str:
    """URL of a database migrated to head (nothing connected to it when the test starts)."""
    if backend == "postgres":
        return _pg_database(request, migrated=True)
    url = f"sqlite:///{tmp_path / 'migrated.db'}"
    database = mantle_db.connect(url)
    try:
        migrations.migrate(database)
    finally:
        mantle_db.close_all(database)
    return url


def _bound(url: str):
    with bound_database(url) as database:
        yield database


@pytest.fixture
def blank_db(db_url):
    """A blank database, connected and bound to the models (not migrated)."""
    yield from _bound(db_url)


@pytest.fixture
def db(migrated_db_url):
    """A database at the head migration, connected and bound to the models."""
    yield from _bound(migrated_db_url)
