"""Cancels reach the node that owns the execution, wherever the request landed (SPEC 13.7).

The node that receives a cancel commits ``cancelled`` itself; the owner must then interrupt
the running attempts within 50 ms. Two ways carry the news:

- PostgreSQL: the cancel's own transaction runs ``NOTIFY mantle_cancel, '<id>'`` (delivered at
  commit, to every node on every host); each node LISTENs on a connection of its own.
- On one host (any database, the only way for SQLite): each node binds an abstract Unix
  datagram socket named after its id (recorded in ``nodes.channel``); the canceller sends the
  id there. Abstract names need no file and vanish with the process.

Both are best effort: the owner also looks at its executions' rows every second. That look
goes through the journal, which may be waiting (an outage's back-off, a row lock) just when a
notification was missed; so the listener, each time it has connected and LISTENs, also looks
on its own connection for the cancelled executions this node owns whose steps still run.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterable

import psycopg

from mantle.db import is_postgres, unwrap

__all__ = ["CancelChannel", "channel_name", "send_cancels", "local_targets"]

log = logging.getLogger("mantle.engine")

_PREFIX = b"cancel "
_PER_NOTICE = 100  # execution ids per datagram (about 3.7 KB)
_NOTICE_BYTES = 8192
_RECONNECT_AFTER = 1.0
# Cancelled executions of this node with a step still pending or running: cancels it has not
# applied yet (through migration 006's index of active step rows).
_MISSED = ("SELECT DISTINCT s.execution_id FROM step_executions s "
           "JOIN workflow_executions e ON e.id = s.execution_id "
           "WHERE s.status IN ('pending', 'running') AND e.status = 'cancelled' "
           "AND e.owner = %s")


def channel_name(node_id: str) -> str:
    """The abstract Unix socket name of a node (``@`` stands for the leading NUL byte)."""
    return f"@mantle-{node_id}"


def _address(name: str) -> str:
    return "\0" + name[1:]


def local_targets(cancelled, channels: dict, host_key: str, me: str | None = None
                  ) -> list[tuple[str, str]]:
    """(channel, execution id) for each cancelled execution (``store.Cancelled.cancelled``)
    whose owner is another node of this host (same ``host_key``) with a channel."""
    targets = []
    for execution_id, _workflow, owner in cancelled:
        if owner is None or owner == me:
            continue
        owner_key, channel = channels.get(owner, (None, None))
        if channel and owner_key == host_key:
            targets.append((channel, execution_id))
    return targets


def send_cancels(targets: Iterable[tuple[str, str]]) -> None:
    """Send each (channel name, execution id) to that node of this host (best effort): the
    ids for one node go together, up to ``_PER_NOTICE`` a datagram, so that a cancel that
    cascades to many sub-workflows run by one node sends it one notice, not a burst.

    Never waits: a node that reads nothing (frozen by SIGSTOP, a frozen VM) has a full queue
    once ``net.unix.max_dgram_qlen`` notices wait in it, and a notice that cannot be queued
    at once is dropped; its owner's once-a-second look finds the cancels when it runs again.
    Waiting would hold up the sender (the Supervisor, or ``mantle cancel``) behind it."""
    by_node: dict[str, list[str]] = {}
    for name, execution_id in targets:
        by_node.setdefault(name, []).append(execution_id)
    if not by_node:
        return
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            for name, ids in by_node.items():
                for start in range(0, len(ids), _PER_NOTICE):
                    notice = _PREFIX + " ".join(ids[start:start + _PER_NOTICE]).encode()
                    try:
                        sock.sendto(notice, _address(name))
                    except OSError:  # gone (taken over later), or its queue is full
                        break
    except OSError:  # no Unix sockets here: the owners' backstop remains
        pass


class CancelChannel:
    """Hears cancels for this node (``on_cancel(execution_id)`` on a channel thread) and
    sends other nodes of this host theirs."""

    def __init__(self, database, node_id: str, on_cancel: Callable[[str], None]):
        self.name = channel_name(node_id)
        self._node_id = node_id
        self._db = unwrap(database)
        self._on_cancel = on_cancel
        self._stop = threading.Event()
        self._socket: socket.socket | None = None
        self._threads: list[threading.Thread] = []

    def start(self) -> CancelChannel:
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(_address(self.name))
            sock.settimeout(0.5)
            self._socket = sock
            self._spawn(self._receive, "mantle-channel")
        except OSError as exc:  # no abstract sockets here: the row backstop remains
            log.warning("cancel channel unavailable", extra={"error": str(exc)})
            self.name = None
        if is_postgres(self._db):
            self._spawn(self._listen, "mantle-listen")
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(2)
        if self._socket is not None:
            self._socket.close()

    def send(self, targets: Iterable[tuple[str, str]]) -> None:
        """Tell each (channel name, execution id) — a node of this host — of its cancel."""
        send_cancels(targets)

    def _spawn(self, target, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _receive(self) -> None:
        """Runs on the channel thread."""
        while not self._stop.is_set():
            try:
                data = self._socket.recv(_NOTICE_BYTES)
            except TimeoutError:
                continue
            except OSError:
                return
            if data.startswith(_PREFIX):
                for execution_id in data[len(_PREFIX):].decode(errors="replace").split():
                    self._deliver(execution_id)

    def _listen(self) -> None:
        """Runs on the listen thread: LISTEN on a connection of its own, reconnecting."""
        while not self._stop.is_set():
            try:
                with psycopg.connect(dbname=self._db.database, autocommit=True,
                                     **self._db.connect_params) as conn:
                    conn.execute("LISTEN mantle_cancel")
                    for (execution_id,) in conn.execute(_MISSED, (self._node_id,)).fetchall():
                        self._deliver(execution_id)  # missed while not listening
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=0.5, stop_after=64):
                            self._deliver(note.payload)
            except psycopg.Error as exc:
                log.debug("cancel listener reconnecting", extra={"error": str(exc).strip()})
                self._stop.wait(_RECONNECT_AFTER)

    def _deliver(self, execution_id: str) -> None:
        try:
            self._on_cancel(execution_id)
        except Exception:  # the next message must still be heard
            log.exception("cancel delivery failed")
