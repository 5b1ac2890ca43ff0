"""Steps a dead owner left running in a cancelled execution (SPEC 4.6, 13.7;
``mantle.store.close_orphaned_steps``, run by daemons with their takeover). The black-box
case, a real owner killed before a cancel, is in ``tests/faults/test_final_states.py``."""

from __future__ import annotations

import datetime as dt
import os
import subprocess

from mantle import store
from mantle.db import transaction
from mantle.db.fields import utcnow
from mantle.db.models import Node, StepExecution
from mantle.services.nodes import host_key, pid_alive
from tests.helpers.waiting import apply_yaml

TWO = """
name: two
steps:
  - {name: a, action: core/sleep, params: {duration: 60s}}
  - {name: b, action: core/sleep, params: {duration: 60s}}
"""


def _execution(owner: str, status: str, step_statuses: dict[str, str]) -> str:
    with transaction():
        execution_id = store.create_execution("two", {}, None, None, owner, "api",
                                              None).execution["id"]
        for step, step_status in step_statuses.items():
            store.write_step(execution_id, step, 1, step_status)
    if status == "cancelled":
        with transaction():
            store.cancel_execution(execution_id, "cli")
    return execution_id


def _lapse(node: str) -> None:
    """End a node's lease a minute ago (as a lease that ran out, long past any floor)."""
    Node.update(lease_expires_at=utcnow() - dt.timedelta(minutes=1)).where(
        Node.id == node).execute()


def _steps(execution_id: str) -> dict[str, tuple[str, bool]]:
    return {row.step_name: (row.status, row.completed_at is not None) for row in
            StepExecution.select().where(StepExecution.execution_id == execution_id)}


def test_only_the_active_steps_of_cancelled_executions_whose_owner_is_gone_are_ended(db):
    apply_yaml(TWO)
    with transaction():
        for node in ("dead", "alive"):
            store.register_node(node, "host", 1, "serve", "key", None, 60)
        _lapse("dead")
    orphaned = _execution("dead", "cancelled", {"a": "running", "b": "completed"})
    no_owner = _execution("never-registered", "cancelled", {"a": "pending"})
    owner_alive = _execution("alive", "cancelled", {"a": "running"})
    running = _execution("dead", "running", {"a": "running"})  # claim_expired's, not ours

    with transaction():
        closed = store.close_orphaned_steps("alive")

    # per execution its workflow and the rows closed, which the caller counts (9.1)
    assert sorted(closed) == sorted([(orphaned, "two", [("a", False)]),
                                     (no_owner, "two", [("a", False)])])
    assert _steps(orphaned) == {"a": ("cancelled", True), "b": ("completed", False)}
    assert _steps(no_owner) == {"a": ("cancelled", True)}
    assert _steps(owner_alive) == {"a": ("running", False)}  # its owner records it
    assert _steps(running) == {"a": ("running", False)}
    with transaction():
        assert store.close_orphaned_steps("alive") == []


def test_a_node_never_takes_over_its_own_executions_when_its_lease_ran_out(db):
    """SPEC 13.7 takeover is of another node's work. A node whose lease ran out (it was
    paused) still runs its executions: claiming them from itself raised their epoch under
    its own actors, whose next write was refused, and they stopped with nobody to run the
    execution (its owner alive)."""
    apply_yaml(TWO)
    with transaction():
        for node in ("paused", "other"):
            store.register_node(node, "host", 1, "serve", "key", None, 60)
        _lapse("paused")
    mine = _execution("paused", "running", {"a": "running"})

    with transaction():
        assert store.claim_expired("paused") == []
    with transaction():
        assert store.claim_expired("other") == [(mine, 2)]


def test_a_dead_neighbours_executions_are_claimed_in_the_round_that_ends_its_lease(db):
    """The takeover round (one transaction) ends the lease of a node of this host whose
    process is gone, then claims expired leases' executions. Ended "now", the lease was not
    yet past for the claim: on PostgreSQL ``now()`` is the transaction's start, so a dead
    ``serve --workers`` worker's executions always waited for the next round (2 s), and its
    cancelled executions' open steps too."""
    apply_yaml(TWO)
    dead = subprocess.Popen(["true"])
    dead.wait()
    with transaction():
        store.register_node("dead", "host", dead.pid, "worker", "key", None, 60)
        store.register_node("me", "host", os.getpid(), "worker", "key", None, 60)
    running = _execution("dead", "running", {"a": "running"})
    cancelled = _execution("dead", "cancelled", {"a": "running"})

    with transaction():
        assert store.expire_dead_neighbours("me", "key", pid_alive) == 1
        closed = store.close_orphaned_steps("me")
        claimed = store.claim_expired("me")

    assert claimed == [(running, 2)]
    assert closed == [(cancelled, "two", [("a", False)])]


def test_a_node_never_closes_the_steps_of_its_own_cancelled_executions_nor_while_lapsed(db):
    """The steps a cancel left to its owner are closed by another node only once the owner
    is gone, as ``claim_expired`` takes work over: never by the owner itself, whose lease
    ran out while it was paused (its actor records them when it runs again: it logged
    ``execution finished`` twice and counted each step twice), and not by a node whose own
    lease ran out (cut off with the others, it would close the steps of owners that had no
    turn to renew yet)."""
    apply_yaml(TWO)
    with transaction():
        for node in ("paused", "dead", "other"):
            store.register_node(node, "host", 1, "serve", "key", None, 60)
        _lapse("paused")
        _lapse("dead")
    own = _execution("paused", "cancelled", {"a": "running"})
    orphaned = _execution("dead", "cancelled", {"a": "running"})

    with transaction():
        assert store.close_orphaned_steps("paused") == []
    assert _steps(own) == _steps(orphaned) == {"a": ("running", False)}
    with transaction():
        closed = store.close_orphaned_steps("other")
    assert sorted(closed) == sorted([(own, "two", [("a", False)]),
                                     (orphaned, "two", [("a", False)])])


def test_a_process_that_cannot_read_its_pid_namespace_tells_no_neighbour_gone(monkeypatch):
    """Processes with one host key judge each other's pids. Containers of one host share
    its boot id; one that cannot read its pid namespace (a sandbox hiding /proc/self/ns)
    used the boot id alone, so it could take another container's live node for a dead
    process of its own and end its lease. It now gets a key of its own."""
    def unreadable(path):
        raise PermissionError(13, "Permission denied", path)

    readable = host_key()
    assert readable == host_key()  # stable where the namespace can be read
    monkeypatch.setattr(os, "readlink", unreadable)
    assert len({readable, host_key(), host_key()}) == 3
