"""The cron scheduler (SPEC 8), driven tick by tick with chosen times, on a real engine and
both databases: once per scheduled minute, within 30 s, no catch-up, no double firing across
restarts or concurrent daemons, trigger changes seen at the next tick."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time

import pytest

from actors.engine import Engine
from mantle.metrics import Metrics
from mantle.db.fields import utcnow as mantle_utcnow
from mantle.services import nodes as nodes_module
from mantle.services import scheduler as scheduler_module
from mantle.services.scheduler import Scheduler
from mantle import db as mantle_db
from mantle.db.connect import connect, is_postgres
from mantle.definitions import rollback
from mantle.db.models import AuditEvent, WorkflowExecution, WorkflowTrigger
from tests.helpers import Background
from tests.helpers.database import lock_waiters
from tests.web.support import apply_yaml, gone_database, wait_until

EVERY_FIVE = """
    name: every-five
    triggers:
      - {type: cron, schedule: "*/5 * * * *"}
    inputs:
      who: {type: string, default: cron}
    steps:
      - {name: hello, action: core/log, params: {message: "{{ inputs.who }} {{ trigger.type }}"}}
"""

AT = dt.datetime(2026, 3, 18, 9, 5)  # a Wednesday, minute 5


def _executions() -> list[WorkflowExecution]:
    return list(WorkflowExecution.select().order_by(WorkflowExecution.started_at))


def test_a_due_minute_fires_exactly_once_even_across_a_restart(engine, db):
    apply_yaml(EVERY_FIVE)
    scheduler = Scheduler(engine, db)
    [execution_id] = scheduler.tick(AT + dt.timedelta(seconds=10))
    assert engine.wait(execution_id, timeout=10) == "completed"
    row = WorkflowExecution.get_by_id(execution_id)
    assert row.trigger == {"type": "cron", "schedule": "*/5 * * * *", "payload": None}
    assert row.inputs == {"who": "cron"}
    assert WorkflowTrigger.get().last_fired_at == AT
    assert AuditEvent.get(AuditEvent.action == "workflow.executed").actor == "scheduler"
    # Later ticks in the same minute, and a new scheduler (a restarted daemon), do nothing.
    assert scheduler.tick(AT + dt.timedelta(seconds=20)) == []
    assert Scheduler(engine, db).tick(AT + dt.timedelta(seconds=29)) == []
    # A minute the schedule does not name; then the next one it does.
    assert scheduler.tick(AT + dt.timedelta(minutes=1, seconds=1)) == []
    assert len(scheduler.tick(AT + dt.timedelta(minutes=5))) == 1
    assert len(_executions()) == 2


def test_a_minute_is_not_caught_up_after_its_30_second_window(engine, db):
    apply_yaml(EVERY_FIVE)
    scheduler = Scheduler(engine, db)
    assert scheduler.tick(AT + dt.timedelta(seconds=30)) == []
    assert scheduler.tick(AT + dt.timedelta(minutes=4, seconds=59)) == []
    assert _executions() == []
    assert WorkflowTrigger.get().last_fired_at is None


def test_two_schedulers_ticking_at_once_fire_a_minute_once(engine, db):
    apply_yaml(EVERY_FIVE)
    results: list[list[str]] = []
    barrier = threading.Barrier(4)

    def tick():
        barrier.wait()
        results.append(Scheduler(engine, db).tick(AT + dt.timedelta(seconds=3)))
        mantle_db.database_proxy.close()  # this thread's connection

    threads = [threading.Thread(target=tick) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(len(fired) for fired in results) == [0, 0, 0, 1]
    assert len(_executions()) == 1


def test_a_firing_that_created_nothing_leaves_the_minute_to_the_next_tick(engine, db,
                                                                          tmp_path):
    """SPEC 8: exactly one execution per scheduled minute. A daemon that is shutting down
    (or is killed, or loses the database) as the minute begins creates nothing; its claim
    on the minute is made in the creating transaction, so it made none either, and another
    daemon's tick (or its own next one) still fires the minute."""
    apply_yaml(EVERY_FIVE)
    stopping = Engine(db, metrics=Metrics(), plugins_dir=str(tmp_path / "plugins")).start()
    try:
        stopping.stop_starting(time.monotonic())
        assert Scheduler(stopping, db).tick(AT + dt.timedelta(seconds=1)) == []
    finally:
        stopping.shutdown(timeout=2)
    assert WorkflowTrigger.get().last_fired_at is None
    [execution_id] = Scheduler(engine, db).tick(AT + dt.timedelta(seconds=11))
    assert engine.wait(execution_id, timeout=10) == "completed"
    assert WorkflowTrigger.get().last_fired_at == AT


def test_trigger_changes_from_apply_are_seen_at_the_next_tick(engine, db):
    apply_yaml(EVERY_FIVE)
    scheduler = Scheduler(engine, db)
    apply_yaml(EVERY_FIVE.replace("*/5 * * * *", "7 9 * * *"))
    assert scheduler.tick(AT + dt.timedelta(seconds=1)) == []
    assert len(scheduler.tick(AT + dt.timedelta(minutes=2, seconds=1))) == 1
    apply_yaml(EVERY_FIVE.replace("triggers:\n      - {type: cron, schedule: \"*/5 * * * *\"}",
                                  "triggers: []"))
    assert WorkflowTrigger.select().count() == 0
    assert scheduler.tick(AT + dt.timedelta(days=1, minutes=2, seconds=1)) == []


def test_a_schedule_changed_after_its_minute_fired_does_not_fire_that_minute_again(
        engine, db):
    """SPEC 8: one execution per scheduled minute. An apply that changes the schedule just
    after the minute fired (still inside its 30 s window) replaces the trigger row: the new
    one starts from the last firing of the workflow's cron triggers, not from none, so the
    next tick does not start a second execution of the minute; later minutes fire."""
    apply_yaml(EVERY_FIVE)
    scheduler = Scheduler(engine, db)
    assert len(scheduler.tick(AT + dt.timedelta(seconds=1))) == 1
    apply_yaml(EVERY_FIVE.replace("*/5 * * * *", "* * * * *"))
    assert scheduler.tick(AT + dt.timedelta(seconds=11)) == []
    assert len(scheduler.tick(AT + dt.timedelta(minutes=1, seconds=1))) == 1
    assert len(_executions()) == 2


def test_a_cron_trigger_removed_and_restored_inside_its_window_does_not_fire_again(
        engine, db):
    """SPEC 8: one execution per scheduled minute. An apply that drops the workflow's cron
    trigger just after its minute fired, then a rollback that brings it back while the
    minute's 30 s last, register a new trigger row: it starts from the workflow's last cron
    firing, not from none, so the minute is not fired a second time."""
    apply_yaml(EVERY_FIVE)
    scheduler = Scheduler(engine, db)
    assert len(scheduler.tick(AT + dt.timedelta(seconds=1))) == 1
    apply_yaml(EVERY_FIVE.replace("triggers:\n      - {type: cron, schedule: \"*/5 * * * *\"}",
                                  "triggers: []"))
    assert WorkflowTrigger.select().count() == 0
    rollback("every-five")
    assert scheduler.tick(AT + dt.timedelta(seconds=11)) == []
    assert len(scheduler.tick(AT + dt.timedelta(minutes=5, seconds=1))) == 1
    assert len(_executions()) == 2


def _in_thread(func):
    def call():
        try:
            return func()
        finally:
            mantle_db.database_proxy.close()  # this thread's connection
    return call


def _apply_racing_a_firing(engine, db, url: str, yaml: str, changed: str) -> list[str]:
    """Apply ``changed`` while the tick of AT is firing ``yaml``'s cron trigger: another
    session holds the trigger row, the firing's claim waits for it, then the apply's
    writes of the trigger rows wait too; released, the firing (first in line) commits, then
    the apply. Returns what the tick fired; both calls must have succeeded."""
    if not is_postgres(db):
        pytest.skip("holds row locks from another session (SQLite: apply and a firing "
                    "take turns on the write lock)")
    apply_yaml(yaml)
    holder, watcher = connect(url), connect(url)
    try:
        holder.execute_sql("BEGIN")
        holder.execute_sql("SELECT 1 FROM workflow_triggers FOR UPDATE")
        firing = Background(_in_thread(
            lambda: Scheduler(engine, db).tick(AT + dt.timedelta(seconds=1))))
        wait_until(lambda: lock_waiters(watcher) == 1)  # the claim waits for the row
        applying = Background(_in_thread(lambda: apply_yaml(changed)))
        wait_until(lambda: lock_waiters(watcher) == 2 or applying.ended_at is not None)
    finally:
        holder.execute_sql("ROLLBACK")
        holder.close()
        watcher.close()
    assert applying.join(10).error is None, applying.error
    assert firing.join(10).error is None, firing.error
    return firing.result


def test_an_apply_racing_a_firing_keeps_the_minute_fired(engine, db, migrated_db_url):
    """SPEC 8/13.7: exactly one execution per scheduled minute, also when the workflow is
    re-applied (same schedule) while the minute is being fired on another node: the new
    trigger row keeps the firing's claim, so no later tick fires the minute again."""
    fired = _apply_racing_a_firing(engine, db, migrated_db_url, EVERY_FIVE,
                                   EVERY_FIVE.replace("default: cron", "default: again"))
    assert len(fired) == 1
    assert WorkflowTrigger.get().last_fired_at == AT
    assert Scheduler(engine, db).tick(AT + dt.timedelta(seconds=11)) == []
    assert len(_executions()) == 1


def test_an_apply_racing_the_firing_of_a_limited_workflow_does_not_deadlock(
        engine, db, migrated_db_url):
    """The firing of a workflow with a limit locks the trigger row (its claim), then the
    workflow row (its limit check); the apply of a new version writes both rows: it must
    take them in the same order, or one of the two fails with a deadlock."""
    limited = EVERY_FIVE.replace("triggers:", "max_parallel_executions: 3\n    triggers:")
    fired = _apply_racing_a_firing(engine, db, migrated_db_url, limited,
                                   limited.replace("default: cron", "default: again"))
    assert len(fired) == 1
    assert Scheduler(engine, db).tick(AT + dt.timedelta(seconds=11)) == []
    assert len(_executions()) == 1


def test_either_day_field_matches_when_both_are_restricted(engine, db):
    apply_yaml(EVERY_FIVE.replace("*/5 * * * *", "0 9 1 * 1"))
    scheduler = Scheduler(engine, db)
    monday = dt.datetime(2026, 3, 16, 9, 0, 5)  # a Monday, not the 1st
    first_of_month = dt.datetime(2026, 4, 1, 9, 0, 5)  # a Wednesday, the 1st
    tuesday = dt.datetime(2026, 3, 17, 9, 0, 5)
    assert len(scheduler.tick(monday)) == 1
    assert len(scheduler.tick(first_of_month)) == 1
    assert scheduler.tick(tuesday) == []


def test_a_rejected_cron_run_is_logged_and_not_retried(engine, db, caplog):
    apply_yaml("""
        name: single
        max_parallel_executions: 1
        on_limit: reject
        triggers: [{type: cron, schedule: "* * * * *"}]
        steps: [{name: wait, action: core/sleep, params: {duration: 30s}}]
    """)
    scheduler = Scheduler(engine, db)
    [first] = scheduler.tick(AT + dt.timedelta(seconds=1))
    with caplog.at_level(logging.WARNING, logger="mantle.scheduler"):
        assert scheduler.tick(AT + dt.timedelta(minutes=1, seconds=1)) == []
    [record] = [r for r in caplog.records if r.getMessage() == "cron execution rejected"]
    assert record.workflow == "single"
    assert record.error == 'workflow "single" has reached the maximum of 1 concurrent executions'
    assert scheduler.tick(AT + dt.timedelta(minutes=1, seconds=2)) == []
    assert len(_executions()) == 1
    engine.cancel(first)


def test_a_tick_during_a_database_outage_skips_with_one_error_log(backend, request, tmp_path,
                                                                  engine, caplog):
    database = gone_database(backend, request, tmp_path)
    try:
        scheduler = Scheduler(engine, database)
        with caplog.at_level(logging.ERROR, logger="mantle.scheduler"):
            assert scheduler.tick(AT + dt.timedelta(seconds=1)) == []
            assert scheduler.tick(AT + dt.timedelta(seconds=2)) == []
        messages = [r.getMessage() for r in caplog.records if r.name == "mantle.scheduler"]
        assert messages == ["cron firing skipped: database unavailable"]
    finally:
        mantle_db.database_proxy.initialize(None)


def test_a_tick_while_writes_are_stuck_waits_for_one_firing_not_one_per_trigger(
        engine, db, migrated_db_url, caplog):
    """SPEC 8 and 13.1: the scheduler wakes at least every 30 s, and during an outage cron
    firings are skipped with an error log. Here the database answers reads but its writes
    wait (another session holds the write lock): the first due firing waits out its run
    timeout; the others are skipped at once instead of each waiting as long (with the
    default 10 s, three due triggers held the scheduler 30 s, past the minute's window and
    into the next minutes'), and the next tick fires them all."""
    for name in ("one", "two", "three"):
        apply_yaml(EVERY_FIVE.replace("every-five", name))
    holder = connect(migrated_db_url)
    try:
        if is_postgres(db):
            holder.execute_sql("BEGIN")
            holder.execute_sql("LOCK TABLE workflow_triggers IN EXCLUSIVE MODE")
        else:
            holder.execute_sql("BEGIN IMMEDIATE")
        scheduler = Scheduler(engine, db, run_timeout=3.0)
        started = time.monotonic()
        with caplog.at_level(logging.ERROR, logger="mantle.scheduler"):
            assert scheduler.tick(AT + dt.timedelta(seconds=1)) == []
        took = time.monotonic() - started
    finally:
        holder.execute_sql("ROLLBACK")
        holder.close()
    assert took < 6.0, f"the tick took {took:.1f} s"
    assert "cron firing skipped: database unavailable" in caplog.messages
    wait_until(lambda: engine.journal.healthy, timeout=10)
    assert len(scheduler.tick(AT + dt.timedelta(seconds=15))) == 3
    assert len(_executions()) == 3


def test_a_host_clock_ahead_does_not_fire_a_minute_early(engine, db, monkeypatch):
    """SPEC 13.7: clock differences between hosts never decide anything. A daemon whose
    host clock is five minutes ahead goes by the database's time (its node's estimate,
    corrected at every lease renewal): it fires the current minute, not one five minutes
    early, which would also have kept every other daemon from firing the minutes between."""
    apply_yaml(EVERY_FIVE.replace("*/5 * * * *", "* * * * *"))
    ahead = dt.timedelta(minutes=5)
    for module in (nodes_module, scheduler_module):  # this host's clock, wherever read
        monkeypatch.setattr(module, "utcnow", lambda: mantle_utcnow() + ahead, raising=False)
    # The node's next lease renewal measures the offset to the database's clock.
    wait_until(lambda: abs(engine.node.db_now() - mantle_utcnow()) < dt.timedelta(seconds=2),
               timeout=15)
    wait_until(lambda: mantle_utcnow().second < 20, timeout=45)  # room in the window
    minute = mantle_utcnow().replace(second=0, microsecond=0)
    [execution_id] = Scheduler(engine, db).tick()
    assert WorkflowTrigger.get().last_fired_at == minute
    assert engine.wait(execution_id, timeout=10) == "completed"


def test_the_scheduler_wakes_just_after_each_minute_and_at_least_every_poll(engine, db):
    scheduler = Scheduler(engine, db, poll_every=10.0)
    assert scheduler._next_delay(1_000_000 * 60 + 55.0) == pytest.approx(5.2)
    assert scheduler._next_delay(1_000_000 * 60 + 1.0) == 10.0
