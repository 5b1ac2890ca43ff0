"""Who owns an execution (SPEC 13.7): nodes, leases, fencing epochs, takeover.

A node's lease (``nodes.lease_expires_at``, in the database's clock) covers every execution it
owns (``workflow_executions.owner``); each execution carries a fencing ``epoch`` that grows
with every change of owner. The engine's writes for an execution are accepted only under the
epoch it was started with (``refused_fences``, checked by the journal for each batch); a live
node takes over the running executions of nodes whose lease expired (``claim_expired``) and
ends the steps they left running in executions cancelled meanwhile (``close_orphaned_steps``).
Statements that differ between the databases come from ``mantle.db.engine``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable

from mantle.db.engine import skip_locked_sql
from mantle.db.fields import utcnow
from mantle.db.models import Node
from mantle.errors import ExecutionStopped, LeaseLost, MantleError
from mantle.store.statements import Statements
from mantle.store.versions import current_versions_query, note_current_versions

__all__ = ["STARTING", "refused_fences", "check_with_writes", "claim_expired",
           "close_orphaned_steps", "close_cancelled_steps", "expire_dead_neighbours",
           "owned_running", "cancelled_among", "register_node", "renew_node", "expire_node",
           "node_channels", "database_now"]

_CHUNK = 500  # ids per IN (...) list


def _chunks(items: list, size: int = _CHUNK):
    for start in range(0, len(items), size):
        yield items[start:start + size]


# The third element of a fence for a write that starts something (an attempt's ``running``
# row, written before the attempt acts): the write also needs the execution still
# ``running``. A cancel leaves the epoch alone, and its owner may hear of it only later (a
# lost notice: up to a second); nothing may start meanwhile (SPEC 4.6).
STARTING = 1


def refused_fences(fences: Iterable[tuple], workflows: Iterable[str] = ()
                   ) -> dict[tuple, MantleError]:
    """The fences that no longer hold, each with the error its writer gets: ``LeaseLost``
    when the execution's epoch is no longer the fence's (another node took it over: write
    nothing more for it), ``ExecutionStopped`` for a ``STARTING`` fence of an execution no
    longer ``running`` (cancelled: start nothing).

    On PostgreSQL the rows read stay share-locked until the transaction ends, so no claim or
    cancel can change them between this check and the commit of the writes it admits; and
    the current versions of ``workflows`` (those the batch's runs will create executions of)
    are read in the same message, so a journal transaction starts with one round trip, not
    two.
    """
    fences = set(fences)
    sql = Statements.of_bound()
    statements = [(f"SELECT id, epoch, status FROM workflow_executions WHERE id IN "
                   f"({sql.placeholders(len(chunk))}) ORDER BY id{sql.share_lock}", tuple(chunk))
                  for chunk in _chunks(sorted({fence[0] for fence in fences}))]
    versions = None if sql.sqlite else current_versions_query(workflows)
    rows: list[tuple] = []
    if versions is None:
        for statement in statements:
            rows += sql.rows(*statement)
    else:
        statements.append(versions)
        results = sql.db.execute_together("; ".join(text for text, _ in statements),
                                          tuple(p for _, params in statements for p in params))
        try:
            for index in range(-len(statements), -1):  # from the end: BEGIN may come first
                results.set_result(index)
                rows += results.fetchall()
            results.set_result(-1)
            note_current_versions(versions[1], results.fetchall())
        finally:
            results.close()
    current = {execution_id: (epoch, status) for execution_id, epoch, status in rows}
    refused: dict[tuple, MantleError] = {}
    for fence in fences:
        epoch, status = current.get(fence[0], (None, None))
        if epoch != fence[1]:
            refused[fence] = LeaseLost(fence[0])
        elif fence[2:] == (STARTING,) and status != "running":
            refused[fence] = ExecutionStopped(fence[0], status)
    return refused


def check_with_writes(database, mark: str, seq: int, fences: Iterable[tuple[str, int]] = (),
                      versions: dict[str, int] | None = None) -> None:
    """PostgreSQL, inside a journal transaction on ``database``: its writes go behind
    ``mantle_journal_check`` (migration 009), which refuses the whole transaction (SQLSTATE
    ``MJ001``, ``journal_check_refused``) if one of ``fences`` no longer holds or one of
    ``versions`` (workflow -> the current version the batch's runs use) is no longer
    current, and sets the journal's ``mark`` to ``seq``, which tells, should the answer to
    its COMMIT be lost, whether it committed (``commit_outcome``).

    What ``refused_fences`` does up front in a round trip of its own, this does in the
    message that carries the writes and COMMIT, for a batch that expects no refusal."""
    batch = Statements.of(database).batch
    versions = versions or {}
    batch.versions.update(versions)
    batch.check = (mark, seq, sorted((fence[0], fence[1], fence[2] if len(fence) > 2 else 0)
                                     for fence in fences), sorted(versions.items()))


def claim_expired(node: str, limit: int = 100, expired_since: dt.datetime | None = None
                  ) -> list[tuple[str, int]]:
    """Take over running executions whose owner's lease expired (or that have no live owner
    row): each gets ``node`` as owner and a new epoch. Returns (id, epoch) of those claimed.

    Only while ``node``'s own lease holds: a node whose lease ran out was itself paused or
    cut off, and so, maybe, were the owners whose leases it would find expired.
    ``expired_since``: only from leases that expired at or after it (``NodeLease.
    takeover_floor``: a node back from an outage leaves the others time to renew).

    Never from ``node`` itself: a node whose own lease ran out (paused, say) still runs those
    executions, and renews its lease when it runs again; claiming them from itself would
    only raise their epoch under its own running actors, which would then have their
    writes refused and stop, leaving the executions running under a live owner with no
    actor.

    One statement on both databases; on PostgreSQL its inner SELECT skips rows another claimer
    or a fenced writer holds (``FOR UPDATE SKIP LOCKED``), so claimers never wait on each
    other and never both win a row."""
    sql = Statements.of_bound()
    p = sql.db.param
    since = "" if expired_since is None else f"AND n.lease_expires_at >= {p} "
    params = () if expired_since is None else (sql.stamp(expired_since),)
    return [(row[0], row[1]) for row in sql.rows(
        f"UPDATE workflow_executions SET owner = {p}, epoch = epoch + 1 WHERE id IN ("
        "SELECT e.id FROM workflow_executions e LEFT JOIN nodes n ON n.id = e.owner "
        f"WHERE e.status = 'running' AND (n.id IS NULL OR (n.lease_expires_at < {sql.now} "
        f"AND n.id <> {p} {since})) AND EXISTS (SELECT 1 FROM nodes me WHERE me.id = {p} "
        f"AND me.lease_expires_at >= {sql.now}) "
        f"ORDER BY e.started_at LIMIT {p}{skip_locked_sql(sql.db, 'e')}) "
        "RETURNING id, epoch", (node, node, *params, node, limit))]


def close_orphaned_steps(node: str, expired_since: dt.datetime | None = None,
                         limit: int = _CHUNK) -> list[tuple[str, str, list[tuple[str, bool]]]]:
    """End ``cancelled`` the steps still pending or running in cancelled executions whose
    owner's lease has expired; returns, per execution, (id, workflow, the (step, is_hook)
    rows closed).

    A cancel commits ``cancelled`` at once and leaves the running attempts to the owner,
    which records them when it has interrupted them (SPEC 4.6). An owner that died first
    never does, and nothing takes a final execution over. A live owner past its lease may
    still write the attempt afterwards: fenced by its epoch, which this leaves alone, that
    write lands, which is what it would have been anyway (a result racing a cancel may be
    stored ``completed``). Found through migration 006's index of active step rows.

    As ``claim_expired`` takes work over (``node``, ``expired_since``): never from ``node``
    itself, whose actors record their steps when it runs again, and only while ``node``'s
    own lease holds."""
    sql = Statements.of_bound()
    p = sql.db.param
    since = "" if expired_since is None else f"AND n.lease_expires_at >= {p} "
    params = () if expired_since is None else (sql.stamp(expired_since),)
    # CROSS JOIN keeps SQLite's planner on the small index first (PostgreSQL plans it as
    # any join): by the status of executions it would go through every cancelled one.
    workflows = dict(sql.rows(
        "SELECT DISTINCT s.execution_id, e.workflow_name FROM step_executions s "
        "CROSS JOIN workflow_executions e LEFT JOIN nodes n ON n.id = e.owner "
        "WHERE e.id = s.execution_id AND s.status IN ('pending', 'running') "
        "AND e.status = 'cancelled' "
        f"AND (n.id IS NULL OR (n.lease_expires_at < {sql.now} AND n.id <> {p} {since})) "
        f"AND EXISTS (SELECT 1 FROM nodes me WHERE me.id = {p} "
        f"AND me.lease_expires_at >= {sql.now}) LIMIT {p}", (node, *params, node, limit)))
    closed = _close_steps(sql, list(workflows)) if workflows else {}
    return [(execution_id, workflow, closed.get(execution_id, []))
            for execution_id, workflow in workflows.items()]


def close_cancelled_steps(execution_id: str) -> list[tuple[str, bool]]:
    """End ``cancelled`` the steps still pending or running of ``execution_id`` if it is
    cancelled: a node that took it over (or restarts it) heard the cancel before it started
    an actor, so no actor of it records them, and its owner is alive, so
    ``close_orphaned_steps`` never will. Returns the (step, is_hook) rows closed."""
    sql = Statements.of_bound()
    p = sql.db.param
    if sql.rows(f"SELECT 1 FROM workflow_executions WHERE id = {p} AND status = 'cancelled'",
                (execution_id,)):
        return _close_steps(sql, [execution_id]).get(execution_id, [])
    return []


def _close_steps(sql: Statements, execution_ids: list[str]
                 ) -> dict[str, list[tuple[str, bool]]]:
    """The rows closed, (step, is_hook), by execution: counted and logged by the caller as
    an actor does its steps (9.1)."""
    closed: dict[str, list[tuple[str, bool]]] = {}
    for execution_id, step, hook in sql.rows(
            f"UPDATE step_executions SET status = 'cancelled', completed_at = {sql.db.param} "
            "WHERE status IN ('pending', 'running') AND execution_id IN "
            f"({sql.placeholders(len(execution_ids))}) "
            "RETURNING execution_id, step_name, is_hook",
            (sql.stamp(utcnow()), *execution_ids)):
        closed.setdefault(execution_id, []).append((step, bool(hook)))
    return closed


def owned_running(node: str) -> list[tuple[str, int]]:
    """(id, epoch) of the running executions ``node`` owns (the owner's reconciliation)."""
    sql = Statements.of_bound()
    p = sql.db.param
    return [(row[0], row[1]) for row in sql.rows(
        f"SELECT id, epoch FROM workflow_executions WHERE owner = {p} AND status = 'running'",
        (node,))]


def expire_dead_neighbours(node: str, host_key: str, alive: Callable[[int], bool]) -> int:
    """Expire at once the leases of nodes of this kernel and pid namespace (``host_key``)
    whose process no longer exists: their executions need not wait out ``lease_ttl``.

    Safe because a pid is only compared within the namespace it belongs to; a reused pid only
    makes a dead node look alive, which leaves it to its lease."""
    sql = Statements.of_bound()
    p = sql.db.param
    rows = sql.rows(f"SELECT id, pid FROM nodes WHERE host_key = {p} AND id <> {p} "
                    f"AND lease_expires_at >= {sql.now}", (host_key, node))
    dead = [node_id for node_id, pid in rows if not alive(pid)]
    for node_id in dead:
        expire_node(node_id)
    return len(dead)


def cancelled_among(execution_ids: list[str]) -> list[str]:
    """Those of ``execution_ids`` that are ``cancelled`` (the owner's backstop for a cancel
    notification that did not arrive)."""
    sql = Statements.of_bound()
    found = []
    for chunk in _chunks(execution_ids):
        found += [row[0] for row in sql.rows(
            f"SELECT id FROM workflow_executions WHERE status = 'cancelled' AND id IN "
            f"({sql.placeholders(len(chunk))})", tuple(chunk))]
    return found


def database_now() -> dt.datetime:
    sql = Statements.of_bound()
    return sql.datetime(sql.rows(f"SELECT {sql.now}")[0][0])


def register_node(node_id: str, hostname: str, pid: int, kind: str, host_key: str,
                  channel: str | None, ttl: float) -> dt.datetime:
    """Insert this process's node row with a fresh lease; returns the database's time."""
    sql = Statements.of_bound()
    p = sql.db.param
    sql.run(f"INSERT INTO nodes (id, hostname, pid, kind, host_key, channel, started_at, "
            f"lease_expires_at) VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {sql.now}, "
            f"{sql.later})", (node_id, hostname, pid, kind, host_key, channel, ttl))
    return database_now()


def renew_node(node_id: str, ttl: float) -> dt.datetime | None:
    """Extend this node's lease by ``ttl`` from the database's now; returns the expiry the
    lease had (None when the row vanished, pruned), read under a lock on PostgreSQL, so that
    a change committed meanwhile (the lease ended by another node) is what it reads.

    Whether the lease lapsed is for the caller to judge once this has committed: until then
    other nodes see the lease as it was, and may take executions over once it has run out,
    however early in this transaction it was still valid."""
    sql = Statements.of_bound()
    p = sql.db.param
    lock = "" if sql.sqlite else " FOR UPDATE"
    before = sql.rows(f"SELECT lease_expires_at FROM nodes WHERE id = {p}{lock}", (node_id,))
    sql.run(f"UPDATE nodes SET lease_expires_at = {sql.later} WHERE id = {p}", (ttl, node_id))
    return sql.datetime(before[0][0]) if before else None


def expire_node(node_id: str) -> None:
    """End a node's lease (clean shutdown, or its process gone): its executions may be taken
    over at once, also by a claim later in the same transaction, whose clock may read the
    same instant (PostgreSQL's is the transaction's start): so it ended a millisecond ago."""
    sql = Statements.of_bound()
    p = sql.db.param
    sql.run(f"UPDATE nodes SET lease_expires_at = {sql.later} WHERE id = {p}",
            (-0.001, node_id))


def node_channels(node_ids: Iterable[str]) -> dict[str, tuple[str, str | None]]:
    """node id -> (host_key, channel) for the given nodes that exist."""
    ids = sorted(set(node_ids))
    if not ids:
        return {}
    return {row.id: (row.host_key, row.channel) for row in
            Node.select(Node.id, Node.host_key, Node.channel).where(Node.id.in_(ids))}
