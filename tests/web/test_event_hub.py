"""The shared event poller (``web.events.EventHub``) against the real databases: PostgreSQL
ids that become visible out of order, ids that never appear, SQLite's holes, and one query
for many streams."""

from __future__ import annotations

import time
import uuid

import psycopg
import pytest

from mantle.db import transaction
from mantle.db.fields import dump_json, utcnow
from mantle.db.models import AuditEvent, WorkflowExecution
from web.events import EventHub, TooManyStreams


def _execution() -> str:
    return WorkflowExecution.create(id=str(uuid.uuid4()), workflow_name="wf", version=1,
                                    status="running", inputs={}, trigger={},
                                    started_at=utcnow()).id


def _started(execution_id: str, attempt: int) -> int:
    return AuditEvent.insert(timestamp=utcnow(), actor="engine", action="step.started",
                             resource_type="step_execution", resource_id="s",
                             metadata={"execution_id": execution_id,
                                       "attempt": attempt}).execute()


def _collect(subscription, count: int, timeout: float = 10.0) -> list:
    """Up to ``count`` events handed to ``subscription`` within ``timeout``."""
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        got += [event for event, _ in subscription.get(0.1)]
    return got


@pytest.fixture
def hub(db):
    made = []

    def make(**options) -> EventHub:
        made.append(EventHub(db, **{"poll_interval": 0.05, **options}))
        return made[-1]

    yield make
    for each in made:
        each.close()


@pytest.fixture
def other_connection(backend, migrated_db_url):
    """A second PostgreSQL session whose transactions the test commits or rolls back."""
    if backend != "postgres":
        pytest.skip("SQLite commits one writer at a time, in id order: nothing to reorder")
    connection = psycopg.connect(migrated_db_url, autocommit=False)
    yield connection
    connection.close()


def _insert_uncommitted(connection, execution_id: str, attempt: int) -> int:
    return connection.execute(
        "INSERT INTO audit_events (timestamp, actor, action, resource_type, resource_id, "
        "metadata) VALUES (%s, 'engine', 'step.started', 'step_execution', 's', %s) "
        "RETURNING id", (utcnow(), dump_json({"execution_id": execution_id,
                                              "attempt": attempt}))).fetchone()[0]


def test_an_id_that_becomes_visible_after_higher_ones_is_still_delivered_in_order(
        hub, other_connection):
    events = hub(gap_wait=30.0)
    execution_id = _execution()
    subscription = events.subscribe(execution_id=execution_id)
    early = _insert_uncommitted(other_connection, execution_id, 1)  # id taken, not visible
    late = _started(execution_id, 2)  # committed first, with the higher id
    assert late > early
    assert _collect(subscription, 1, timeout=1.0) == []  # held behind the missing id
    other_connection.commit()
    got = _collect(subscription, 2)
    assert [(event.id, event.data["attempt"]) for event in got] == [(2 * early, 1),
                                                                    (2 * late, 2)]


def test_an_id_that_never_appears_delays_later_ones_by_the_gap_wait_only(
        hub, other_connection):
    events = hub(gap_wait=0.5)
    execution_id = _execution()
    subscription = events.subscribe(execution_id=execution_id)
    _insert_uncommitted(other_connection, execution_id, 1)
    late = _started(execution_id, 2)
    started = time.monotonic()
    other_connection.rollback()
    got = _collect(subscription, 1)
    assert [event.id for event in got] == [2 * late]
    assert time.monotonic() - started < 5.0


def test_a_hole_in_the_ids_is_passed_at_once_on_sqlite(hub, backend, db):
    if backend != "sqlite":
        pytest.skip("on PostgreSQL a hole is waited for (tests above)")
    events = hub(gap_wait=30.0)
    execution_id = _execution()
    subscription = events.subscribe(execution_id=execution_id)
    with transaction():  # the poller never sees the row of the hole
        hole = _started(execution_id, 1)
        kept = _started(execution_id, 2)
        AuditEvent.delete().where(AuditEvent.id == hole).execute()
    got = _collect(subscription, 1, timeout=2.0)
    assert [event.id for event in got] == [2 * kept]


def test_many_streams_share_one_poll_and_each_gets_what_it_asked_for(hub, db):
    events = hub(max_streams=50)
    first, second = _execution(), _execution()
    mine = [events.subscribe(execution_id=first) for _ in range(20)]
    theirs = [events.subscribe(execution_id=second) for _ in range(20)]
    everything = events.subscribe()
    with pytest.raises(TooManyStreams):
        for _ in range(20):
            events.subscribe()
    assert events.open_streams == 50
    _started(first, 1)
    _started(second, 1)
    assert all(len(_collect(s, 1)) == 1 for s in mine + theirs)
    assert {e.execution_id for e in _collect(everything, 2)} == {first, second}
    assert [event.execution_id for s in mine for event, _ in s.get(0)] == []
    for subscription in mine + theirs:
        subscription.close()
    assert events.open_streams == 10
