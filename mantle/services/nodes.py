"""This process as a node (SPEC 13.7): its row, its lease, and the database's clock.

Every process that runs executions registers a node row under a random id (never
``hostname:pid``, which repeats after a container restart) and renews its lease every third of
``lease_ttl`` on a thread and a database connection of its own, so renewals never queue behind
the journal's writes. A renewal that finds the lease had lapsed (the process was paused, or
the database unreachable, for longer than the ttl) reports it: other nodes may have taken
executions over meanwhile, and the engine checks its executions' epochs.

Times that decide anything between nodes come from the database: ``db_now()`` is this host's
clock corrected by the offset measured at each renewal.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

from mantle.db import is_outage, reserve_connection, reset_connection, transaction
from mantle.db.fields import utcnow
from mantle.store import database_now, expire_node, register_node, renew_node

__all__ = ["NodeLease", "host_key", "pid_alive", "DEFAULT_LEASE_TTL"]

log = logging.getLogger("mantle.engine")

DEFAULT_LEASE_TTL = 15.0
_RETRY_EVERY = 1.0  # after a failed renewal


def host_key() -> str:
    """Names the kernel boot and pid namespace of this process: two processes with the same
    key see each other's pids, so one may tell that the other is gone.

    Where either cannot be read, the key is this call's own: containers of one host share
    its boot, and one that took another's pid for a process of its own namespace would end
    the lease of a live node. Such a process tells no neighbour gone (leases still run out)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            boot = handle.read().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return uuid.uuid4().hex
    return hashlib.sha256(f"{boot}|{namespace}".encode()).hexdigest()[:32]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class NodeLease:
    """Registers the node, keeps its lease, and ends it on ``stop``.

    ``on_lapse()`` runs on the lease thread after a renewal found the lease had lapsed.
    """

    def __init__(self, database, kind: str, ttl: float = DEFAULT_LEASE_TTL,
                 channel: str | None = None, on_lapse: Callable[[], None] | None = None):
        self.id = str(uuid.uuid4())
        self.kind = kind
        self.ttl = ttl
        self.channel = channel
        self.hostname = socket.gethostname()
        self.pid = os.getpid()
        self.host_key = host_key()
        self._db = database
        self._on_lapse = on_lapse
        self._offset = dt.timedelta(0)
        self._renewed_at = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mantle-lease", daemon=True)
        self._failing = False
        self._unjudged = False  # a renewal committed whose lapse could not be judged
        self._steady_since: dt.datetime | None = None  # database time; see takeover_floor
        # Held by a renewal from its first statement to its judgement; see ``claim``.
        self._renewing = threading.Lock()

    def start(self) -> NodeLease:
        """Register the node row (before any execution can name this node as its owner)."""
        self._register()
        self._thread.start()
        return self

    def db_now(self) -> dt.datetime:
        """The database's current time, estimated from this host's clock."""
        return utcnow() + self._offset

    def takeover_floor(self) -> dt.datetime | None:
        """None, or the earliest lease expiry whose executions this node may take over now.

        After this node's own renewals failed or its lease lapsed (the database was out of
        reach, or its write lock held, for a while), the other nodes' leases may have run
        out for the same reason: for one lease period after it renewed again it takes over
        only from the leases that ran out a renewal interval or more after that, so that
        every node cut off with it has had a turn to renew before its work is taken."""
        since = self._steady_since
        if since is None or self.db_now() >= since + dt.timedelta(seconds=self.ttl):
            return None
        return since + dt.timedelta(seconds=max(self.ttl / 3, _RETRY_EVERY))

    def claim(self, take: Callable[[dt.datetime | None], list]) -> list:
        """``take(takeover_floor())``, or [] while a renewal of this lease is under way.

        ``take`` runs a statement that reads this node's lease in the database; the floor
        it is given must be of the same moment. A renewal commits the new lease and then
        judges whether the old one had lapsed and sets the floor: read in between, the
        floor is still the old one while the statement already sees the renewed lease, and
        takes over work of nodes that had no turn to renew yet. So a claim never runs
        alongside a renewal (it is tried again at the next takeover round); it does not
        wait for one either, as it may hold the database's write lock the renewal waits
        for (SQLite)."""
        if not self._renewing.acquire(blocking=False):
            return []
        try:
            return take(self.takeover_floor())
        finally:
            self._renewing.release()

    @property
    def seconds_since_renewal(self) -> float:
        return time.monotonic() - self._renewed_at

    def stop(self) -> None:
        """Stop renewing and end the lease now, so another node may resume at once what this
        one leaves behind."""
        self._stop.set()
        self._thread.join(5)
        try:
            with transaction(self._db):
                expire_node(self.id)
        except Exception as exc:  # the lease then simply runs out
            log.warning("could not end the node lease", extra={"error": str(exc).strip()})
        finally:
            reset_connection(self._db)

    # --- lease thread ---

    def _register(self) -> None:
        with transaction(self._db):
            now = register_node(self.id, self.hostname, self.pid, self.kind, self.host_key,
                                self.channel, self.ttl)
        self._measured(now)

    def _run(self) -> None:
        reserve_connection(self._db)  # never behind other work for a place in the pool
        delay = self.ttl / 3
        while not self._stop.wait(delay):
            try:
                with self._renewing:  # until the floor is set: no claim meanwhile
                    with transaction(self._db):
                        before = renew_node(self.id, self.ttl)
                        if before is None:  # gone (pruned): make sure the row exists
                            self._reregister()
                    # Judged by the database's time after the commit: until then other nodes
                    # saw the lease as it was. A renewal committed but not judged (this read
                    # failed) counts as lapsed at the next one.
                    unjudged, self._unjudged = self._unjudged, True
                    now = database_now()
                    lapsed = unjudged or before is None or before < now
                    self._unjudged = False
                    if lapsed or self._failing:
                        self._steady_since = now
            except Exception as exc:
                self._failed(exc)
                delay = _RETRY_EVERY
                continue
            delay = self.ttl / 3
            self._measured(now)
            if self._failing:
                self._failing = False
                log.info("node lease renewed again")
            if lapsed:
                log.warning("node lease lapsed", extra={"node": self.id})
                if self._on_lapse is not None:
                    self._on_lapse()
        reset_connection(self._db)

    def _reregister(self) -> None:
        from mantle.db.models import Node

        if Node.get_or_none(Node.id == self.id) is None:
            register_node(self.id, self.hostname, self.pid, self.kind, self.host_key,
                          self.channel, self.ttl)

    def _measured(self, database_time: dt.datetime) -> None:
        self._renewed_at = time.monotonic()
        self._offset = database_time - utcnow()

    def _failed(self, exc: BaseException) -> None:
        if is_outage(exc):
            reset_connection(self._db)
        if not self._failing:
            self._failing = True
            log.error("node lease renewal failed", extra={"error": str(exc).strip()})
